"""OpenAI-compatible HTTP server: one base model, N named adapters chosen per request by `model`.

Endpoints: GET /v1/models, POST /v1/chat/completions (JSON or SSE stream), POST /v1/completions,
admin: GET/POST /admin/adapters, PUT/DELETE /admin/adapters/{name}; GET /health (no key needed).
Every error is an OpenAI-style JSON body ({"error": {...}}) with a 4xx status for client mistakes; an
unexpected failure gives a 500 with a generic message (the traceback goes to the server log only).

The pieces: `routes/` (one APIRouter per area), `state` (the shared `ServerState` and the FastAPI dependencies
that hand it out and check the key), `errors` (the OpenAI error shape), `sse` (streaming), `pool` (batching).
This module only assembles them. It is imported by `loraforge serve` (and tests), never by the rest of the
package.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI

from loraforge.inference import InferenceModel
from loraforge.serve.config import ServerConfig
from loraforge.serve.errors import ApiError, install_error_handlers  # noqa: F401 (ApiError: importable here)
from loraforge.serve.routes import admin, completions, models
from loraforge.serve.routes.completions import ADAPTER_HEADER  # noqa: F401 (importable here)
from loraforge.serve.state import ServerState

log = logging.getLogger("loraforge.serve")


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The batch scheduler runs while the app does; on shutdown every running generation stops at its next token."""
    state: ServerState = app.state.loraforge
    state.shutdown.clear()
    state.pool.start()
    try:
        yield
    finally:
        state.shutdown.set()
        state.pool.stop()


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
    app = FastAPI(title="loraforge", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.loraforge = ServerState(config, model)
    install_error_handlers(app)
    for area in (models, completions, admin):
        app.include_router(area.router)
    return app


def run_server(config: ServerConfig, model: InferenceModel | None = None) -> None:
    """Serve until interrupted (the `loraforge serve` command)."""
    import ipaddress
    import signal

    import uvicorn

    try:
        loopback = ipaddress.ip_address(config.host).is_loopback
    except ValueError:
        loopback = config.host == "localhost"
    if not loopback and not config.api_key:
        log.warning("serving on %s without an api_key: anyone who can reach this port can use and change the models",
                    config.host)
    if not log.handlers:  # the server's own notes (a stream cancelled, the shutdown) go beside uvicorn's
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    app = create_app(config, model)
    # uvicorn re-raises the SIGTERM it handled once it has shut down; this handler turns that into a clean exit
    # (status 0) after the graceful shutdown instead of death by signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: log.info("shut down on SIGTERM"))
    uvicorn.run(app, host=config.host, port=config.port, log_level="info",
                timeout_graceful_shutdown=config.shutdown_timeout_s)
