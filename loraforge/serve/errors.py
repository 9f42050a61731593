"""Every error the server answers is an OpenAI-style JSON body (`{"error": {...}}`), never a traceback.

Client mistakes get a 4xx naming the field where one is known; an unexpected failure gives a 500 with a generic
message (the traceback goes to the server log only).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraforge.errors import LoraforgeError
from loraforge.serve import protocol as P

log = logging.getLogger("loraforge.serve")


class ApiError(Exception):
    """An error answered as an OpenAI-style body with `status`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", *, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse(P.error_body(message, type_, param=param, code=code), status_code=status)


async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return error_response(err.status, err.message, err.type, err.param, err.code)


async def _validation(request: Request, err: RequestValidationError) -> JSONResponse:
    """pydantic's errors as one 400 that names every bad field (the first one as `param`)."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid').removeprefix('Value error, ')}")
    first = next((".".join(str(x) for x in e.get("loc", ()) if x != "body") for e in err.errors()), None)
    if any(tuple(e.get("loc", ())) == ("body",) and e.get("type") != "value_error" for e in err.errors()):
        parts.append("send a JSON object with `Content-Type: application/json`")
    return error_response(400, "Invalid request: " + "; ".join(parts), param=first or None, code="invalid_request")


async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    return error_response(err.status_code, str(err.detail), kind)


async def _user_error(request: Request, err: LoraforgeError) -> JSONResponse:
    return error_response(400, err.format(), code="invalid_value")


class _InternalErrors:
    """ASGI middleware: an unexpected exception becomes a 500 JSON answer and goes no further.

    Starlette's own handler for `Exception` answers and then re-raises, which makes the server drop the kept-alive
    connection; a client's other requests on it would fail although nothing is wrong with them."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:  # noqa: BLE001 — the point of this middleware
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            if started:  # a stream already under way: nothing to answer with, the server closes it
                raise
            response = error_response(500, "internal server error (details are in the server log)", "server_error")
            await response(scope, receive, send)


def install_error_handlers(app: Any) -> None:
    """Answer every error of `app` in the OpenAI shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(LoraforgeError, _user_error)
    app.add_middleware(_InternalErrors)
