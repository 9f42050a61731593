"""GET /health (no key needed), GET /v1/models, GET /v1/models/{name}."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from loraforge.serve import protocol as P
from loraforge.serve.state import State, require_key

router = APIRouter()


@router.get("/health")
async def health(state: State) -> dict[str, Any]:
    """Liveness and the batch scheduler's counters."""
    return {"status": "ok", "models": state.model_names(), **state.pool.stats(), "cancelled": state.cancelled}


@router.get("/v1/models", dependencies=[Depends(require_key)])
async def list_models(state: State) -> dict[str, Any]:
    """`base`, the adapters and the A/B routes."""
    return P.model_list(state.model_names())


@router.get("/v1/models/{name}", dependencies=[Depends(require_key)])
async def get_model(name: str, state: State) -> dict[str, Any]:
    """One model's entry; 404 (with the list) when unknown."""
    state.pick_adapter(name)
    return P.model_list([name])["data"][0]
