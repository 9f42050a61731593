"""Assemble the web UI: the workspace, the job manager, the chat models, the security checks, the API routes,
the page and its static files; `run_webui` serves it (the `loraforge webui` command)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from loraforge.webui.chat import ChatModels
from loraforge.webui.runs import JobManager
from loraforge.webui.security import LOOPBACK_NAMES, install, is_loopback
from loraforge.webui.workspace import Workspace

STATIC = Path(__file__).parent / "static"


@dataclass
class WebUI:
    ws: Workspace
    jobs: JobManager
    chat: ChatModels


def create_app(workspace: str | Path, *, extra_roots: Sequence[str | Path] = (), token: str | None = None,
               allowed_hosts: set[str] | None = None) -> Any:
    """The FastAPI app. `token`: required on every request when set. `allowed_hosts`: Host header names served
    (None: any, for a server behind a token on a public address)."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles

    from loraforge.webui import pages, routes

    ws = Workspace(Path(workspace), [Path(r) for r in extra_roots])
    app = FastAPI(title="loraforge webui", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.webui = WebUI(ws, JobManager(ws), ChatModels(ws))
    install(app, token=token, allowed_hosts=allowed_hosts)
    app.include_router(routes.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return pages.index(ws)

    return app


def run_webui(workspace: str | Path, *, host: str = "127.0.0.1", port: int = 7860, token: str | None = None,
              extra_roots: Sequence[str | Path] = (), echo: Callable[[str], None] = print) -> None:
    """Serve until interrupted. A non-loopback host always needs a token (one is made when none is given)."""
    import uvicorn

    loopback = is_loopback(host)
    if not loopback and not token:
        token = secrets.token_urlsafe(24)
    allowed = (LOOPBACK_NAMES | {host}) if loopback else None
    app = create_app(workspace, extra_roots=extra_roots, token=token, allowed_hosts=allowed)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown if ':' not in shown else f'[{shown}]'}:{port}/"
    echo(f"loraforge webui: workspace {Path(workspace).resolve()} (loading torch and transformers…)")
    # Import them once here: transformers' lazy imports are not safe when two request threads race on them.
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    echo(f"open {url}" + (f"?token={token}" if token else ""))
    if not loopback:
        echo(f"listening on {host}: every request needs the token above")
    uvicorn.run(app, host=host, port=port, log_level="warning")
