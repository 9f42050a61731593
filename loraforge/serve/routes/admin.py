"""Adapters at run time: GET/POST /admin/adapters, PUT/DELETE /admin/adapters/{name}.

No lock of ours here: the model lock serializes loading with generation, in the worker thread.
"""

from __future__ import annotations

from typing import Any, Callable

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from loraforge.errors import LoraforgeError
from loraforge.inference import BASE
from loraforge.serve import protocol as P
from loraforge.serve.errors import ApiError
from loraforge.serve.state import ServerState, State, require_key

router = APIRouter(prefix="/admin", dependencies=[Depends(require_key)])


def _entry(state: ServerState, name: str) -> dict[str, Any]:
    """One adapter as the admin API shows it: name, path, PEFT type, version."""
    info = state.model.adapter_info(name)
    return {"name": name, "path": str(info.path) if info else None, "type": info.peft_type if info else None,
            "version": info.internal_name.rsplit("@", 1)[-1] if info else None}


async def _call(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a model call in a worker thread, mapping its refusals to 409 (name taken), 404 (no such adapter) or
    400 (a bad path or adapter).

    Raises:
        ApiError: the mapped refusal.
    """
    try:
        return await run_in_threadpool(fn, *args)
    except LoraforgeError as err:
        text = err.format()
        status = 409 if "already loaded" in text else 404 if "no adapter with this name" in text else 400
        raise ApiError(status, text, code="adapter_error") from None


@router.get("/adapters")
async def admin_list(state: State) -> dict[str, Any]:
    return {"adapters": [_entry(state, n) for n in state.model.adapter_names if n != BASE],
            "routes": {k: [t.model_dump() for t in v] for k, v in state.routes.items()}}


@router.post("/adapters", status_code=201)
async def admin_load(body: P.AdapterLoad, state: State) -> Any:
    if body.name in state.routes:
        raise ApiError(409, f"`{body.name}` is an A/B route name", code="name_taken")
    await _call(state.model.load_adapter, body.name, body.path)
    return JSONResponse(_entry(state, body.name), status_code=201)


@router.put("/adapters/{name}")
async def admin_replace(name: str, body: P.AdapterReplace, state: State) -> dict[str, Any]:
    old, _new = await _call(state.model.replace_adapter, name, body.path)
    return {**_entry(state, name), "previous_path": str(old.path)}


@router.delete("/adapters/{name}")
async def admin_unload(name: str, state: State) -> dict[str, Any]:
    users = [r for r, targets in state.routes.items() if any(t.adapter == name for t in targets)]
    if users:
        raise ApiError(409, f"adapter `{name}` is used by route(s) {', '.join(users)}; change the route first",
                       code="adapter_in_use")
    info = await _call(state.model.unload_adapter, name)
    return {"name": name, "path": str(info.path), "unloaded": True}
