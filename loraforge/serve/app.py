"""OpenAI-compatible HTTP server: one base model, N named adapters chosen per request by `model`.

Endpoints: GET /v1/models, POST /v1/chat/completions (JSON or SSE stream), POST /v1/completions,
admin: GET/POST /admin/adapters, PUT/DELETE /admin/adapters/{name}; GET /health (no key needed).
Every error is an OpenAI-style JSON body ({"error": {...}}) with a 4xx status for client mistakes; an
unexpected failure gives a 500 with a generic message (the traceback goes to the server log only).
"""

from __future__ import annotations

import hmac
import json
import logging
import random
import threading
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Generator, Iterator

# FastAPI resolves endpoint annotations by name from this module's globals, so these imports live at the top;
# this module is only imported by `loraforge serve` (and tests), never by the rest of the package.
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraforge.errors import LoraforgeError, suggestion
from loraforge.inference import BASE, GenerationSettings, InferenceModel
from loraforge.serve import protocol as P
from loraforge.serve.config import RouteTarget, ServerConfig
from loraforge.serve.pool import GenerationPool

log = logging.getLogger("loraforge.serve")
ADAPTER_HEADER = "x-loraforge-adapter"


class ApiError(Exception):
    """An error answered as an OpenAI-style body with `status`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", *, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


class ServerState:
    """What the endpoints share: the model, the generation pool, the A/B routes and the admission counter."""

    def __init__(self, config: ServerConfig, model: InferenceModel):
        self.config = config
        self.model = model
        self.pool = GenerationPool(model, scheduling=config.scheduling, max_batch_size=config.max_batch_size,
                                   batch_window_ms=config.batch_window_ms)
        self.routes: dict[str, list[RouteTarget]] = dict(config.routes)
        self.rng = random.Random(config.route_seed)
        self.count_lock = threading.Lock()  # streams release their slot from a worker thread
        self.in_flight = 0

    def model_names(self) -> list[str]:
        return self.model.adapter_names + list(self.routes)

    def pick_adapter(self, name: str) -> str:
        """The adapter that serves public model `name` (a weighted draw for an A/B route).

        Raises:
            ApiError: 404 with the list of models when the name is unknown.
        """
        if name in self.routes:
            targets = self.routes[name]
            return self.rng.choices([t.adapter for t in targets], weights=[t.weight for t in targets])[0]
        if name in self.model.adapter_names:
            return name
        names = self.model_names()
        hint = suggestion(name, names)
        raise ApiError(404, f"The model `{name}` does not exist. Available models: {', '.join(names)}."
                       + (f" {hint[0].upper()}{hint[1:]}" if hint else ""), param="model", code="model_not_found")


def _settings(config: ServerConfig, req: P._Sampling, max_tokens: int | None) -> GenerationSettings:
    limit = max_tokens or config.default_max_tokens
    if limit > config.max_tokens_limit:
        raise ApiError(400, f"max_tokens must be at most {config.max_tokens_limit} on this server (got {limit})",
                       param="max_tokens", code="invalid_value")
    temperature = config.default_temperature if req.temperature is None else req.temperature
    return GenerationSettings(max_new_tokens=limit, temperature=temperature,
                              top_p=1.0 if req.top_p is None else req.top_p, stop=list(req.stop or []), seed=req.seed)


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _relay(stream: Any, chunk: Callable[[str], dict[str, Any]]) -> Generator[str, None, bool]:
    """SSE events for each text delta of `stream`; returns False after reporting a failure in-band (the status
    line is already sent, so an error can only be an event) and ending the stream with [DONE]."""
    try:
        for delta in stream:
            yield _sse(chunk(delta))
    except Exception as err:
        log.exception("generation failed during a stream")
        message = err.format() if isinstance(err, LoraforgeError) else "internal error during generation"
        yield _sse(P.error_body(message, "server_error"))
        yield _sse("[DONE]")
        return False
    finally:
        stream.close()
    return True


def create_app(config: ServerConfig, model: InferenceModel | None = None) -> Any:
    """Build the FastAPI app. Loads the base model and adapters unless a loaded `model` is given
    (tests and benchmarks share one model between several apps).

    Raises:
        ModelError / ConfigError: a bad base model or adapter in the config.
    """
    if model is None:
        model = InferenceModel.load(config.base_model, config.adapters, dtype=config.dtype,
                                    trust_remote_code=config.trust_remote_code,
                                    adapter_roots=config.adapter_roots or None)
    state = ServerState(config, model)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.pool.start()
        try:
            yield
        finally:
            state.pool.stop()

    app = FastAPI(title="loraforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.loraforge = state

    # --- errors: always the OpenAI shape, never a traceback ------------------------------------------------

    def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                       code: str | None = None) -> JSONResponse:
        return JSONResponse(P.error_body(message, type_, param=param, code=code), status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, err.message, err.type, err.param, err.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError) -> JSONResponse:
        parts = []
        for e in err.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid').removeprefix('Value error, ')}")
        first = next((".".join(str(x) for x in e.get("loc", ()) if x != "body") for e in err.errors()), None)
        if any(tuple(e.get("loc", ())) == ("body",) for e in err.errors()):
            parts.append("send a JSON object with `Content-Type: application/json`")
        return error_response(400, "Invalid request: " + "; ".join(parts), param=first or None, code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error_response(err.status_code, str(err.detail), kind)

    @app.exception_handler(LoraforgeError)
    async def _user_error(request: Request, err: LoraforgeError) -> JSONResponse:
        return error_response(400, err.format(), code="invalid_value")

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error (details are in the server log)", "server_error")

    # --- auth and admission ------------------------------------------------------------------------------

    async def require_key(request: Request) -> None:
        if not config.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "Invalid or missing API key: send `Authorization: Bearer <key>`.",
                           code="invalid_api_key")

    class _Admission:
        """One of `max_concurrency` slots; a stream keeps its slot until the stream is closed."""

        def __init__(self) -> None:
            with state.count_lock:
                if state.in_flight >= config.max_concurrency:
                    raise ApiError(429, f"server busy: {config.max_concurrency} requests in flight; retry shortly",
                                   "rate_limit_error", code="too_many_requests")
                state.in_flight += 1
                self.held = True

        def release(self) -> None:
            with state.count_lock:
                if self.held:
                    self.held = False
                    state.in_flight -= 1

        def __enter__(self) -> "_Admission":
            return self

        def __exit__(self, *exc: Any) -> None:
            self.release()

    def streaming(events: Iterator[str], slot: "_Admission", headers: dict[str, str]) -> Any:
        from starlette.background import BackgroundTask

        def guarded() -> Iterator[str]:
            try:
                yield from events
            finally:
                slot.release()

        return StreamingResponse(guarded(), media_type="text/event-stream", background=BackgroundTask(slot.release),
                                 headers={**headers, "cache-control": "no-cache"})

    auth = [Depends(require_key)]

    # --- OpenAI endpoints ----------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": state.model_names(), **state.pool.stats()}

    @app.get("/v1/models", dependencies=auth)
    async def list_models() -> dict[str, Any]:
        return P.model_list(state.model_names())

    @app.get("/v1/models/{name}", dependencies=auth)
    async def get_model(name: str) -> dict[str, Any]:
        state.pick_adapter(name)  # 404 when unknown
        return P.model_list([name])["data"][0]

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(req: P.ChatCompletionRequest) -> Any:
        adapter = state.pick_adapter(req.model)
        settings = _settings(config, req, req.token_limit())
        messages = req.chat_messages()
        headers = {ADAPTER_HEADER: adapter}
        rid = P.new_id("chatcmpl")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            slot = _Admission()
            try:
                stream = await run_in_threadpool(state.model.stream, messages, adapter, settings)
            except BaseException:
                slot.release()
                raise

            def events() -> Iterator[str]:
                yield _sse(P.chat_chunk(rid, req.model, adapter, {"role": "assistant", "content": ""}))
                if not (yield from _relay(stream, lambda d: P.chat_chunk(rid, req.model, adapter, {"content": d}))):
                    return
                result = stream.result
                yield _sse(P.chat_chunk(rid, req.model, adapter, {}, result.finish_reason if result else "stop"))
                if include_usage and result:
                    yield _sse(P.chat_chunk(rid, req.model, adapter, {}, None,
                                            P.usage(result.prompt_tokens, result.completion_tokens), empty_choices=True))
                yield _sse("[DONE]")

            return streaming(events(), slot, headers)
        with _Admission():
            result = (await state.pool.generate([messages], adapter, settings))[0]
        body = P.chat_completion(rid, req.model, adapter, result.text, result.finish_reason,
                                 result.prompt_tokens, result.completion_tokens)
        return JSONResponse(body, headers=headers)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(req: P.CompletionRequest) -> Any:
        adapter = state.pick_adapter(req.model)
        settings = _settings(config, req, req.max_tokens)
        prompts: list[str] = list(req.prompt)
        headers = {ADAPTER_HEADER: adapter}
        rid = P.new_id("cmpl")
        if req.stream:
            slot = _Admission()
            try:
                stream = await run_in_threadpool(state.model.stream, prompts[0], adapter, settings)
            except BaseException:
                slot.release()
                raise

            def events() -> Iterator[str]:
                if req.echo:
                    yield _sse(P.text_completion(rid, req.model, adapter, [{"index": 0, "text": prompts[0],
                                                                            "finish_reason": None, "logprobs": None}], None))
                if not (yield from _relay(stream, lambda d: P.text_completion(
                        rid, req.model, adapter, [{"index": 0, "text": d, "finish_reason": None, "logprobs": None}],
                        None))):
                    return
                reason = stream.result.finish_reason if stream.result else "stop"
                yield _sse(P.text_completion(rid, req.model, adapter, [{"index": 0, "text": "", "finish_reason": reason,
                                                                        "logprobs": None}], None))
                yield _sse("[DONE]")

            return streaming(events(), slot, headers)
        with _Admission():
            results = await state.pool.generate(prompts, adapter, settings)
        choices = [{"index": i, "text": (prompts[i] if req.echo else "") + r.text, "finish_reason": r.finish_reason,
                    "logprobs": None} for i, r in enumerate(results)]
        body = P.text_completion(rid, req.model, adapter, choices,
                                 P.usage(sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)))
        return JSONResponse(body, headers=headers)

    # --- admin: load / unload / replace adapters at run time -------------------------------------------------

    def adapter_entry(name: str) -> dict[str, Any]:
        info = state.model.adapter_info(name)
        return {"name": name, "path": str(info.path) if info else None, "type": info.peft_type if info else None,
                "version": info.internal_name.rsplit("@", 1)[-1] if info else None}

    def admin_call(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except LoraforgeError as err:
            text = err.format()
            status = 409 if "already loaded" in text else 404 if "no adapter with this name" in text else 400
            raise ApiError(status, text, code="adapter_error") from None

    @app.get("/admin/adapters", dependencies=auth)
    async def admin_list() -> dict[str, Any]:
        return {"adapters": [adapter_entry(n) for n in state.model.adapter_names if n != BASE],
                "routes": {k: [t.model_dump() for t in v] for k, v in state.routes.items()}}

    @app.post("/admin/adapters", dependencies=auth, status_code=201)
    async def admin_load(body: P.AdapterLoad) -> Any:
        if body.name in state.routes:
            raise ApiError(409, f"`{body.name}` is an A/B route name", code="name_taken")
        # No lock of ours here: the model lock serializes loading with generation, in the worker thread.
        await run_in_threadpool(admin_call, state.model.load_adapter, body.name, body.path)
        return JSONResponse(adapter_entry(body.name), status_code=201)

    @app.put("/admin/adapters/{name}", dependencies=auth)
    async def admin_replace(name: str, body: P.AdapterReplace) -> dict[str, Any]:
        old, _new = await run_in_threadpool(admin_call, state.model.replace_adapter, name, body.path)
        return {**adapter_entry(name), "previous_path": str(old.path)}

    @app.delete("/admin/adapters/{name}", dependencies=auth)
    async def admin_unload(name: str) -> dict[str, Any]:
        users = [r for r, targets in state.routes.items() if any(t.adapter == name for t in targets)]
        if users:
            raise ApiError(409, f"adapter `{name}` is used by route(s) {', '.join(users)}; change the route first",
                           code="adapter_in_use")
        info = await run_in_threadpool(admin_call, state.model.unload_adapter, name)
        return {"name": name, "path": str(info.path), "unloaded": True}

    return app


def run_server(config: ServerConfig, model: InferenceModel | None = None) -> None:
    """Serve until interrupted (the `loraforge serve` command)."""
    import ipaddress

    import uvicorn

    try:
        loopback = ipaddress.ip_address(config.host).is_loopback
    except ValueError:
        loopback = config.host == "localhost"
    if not loopback and not config.api_key:
        log.warning("serving on %s without an api_key: anyone who can reach this port can use and change the models",
                    config.host)
    app = create_app(config, model)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
