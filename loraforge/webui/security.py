"""Safe by default: loopback only unless a token is given; a request from another site is refused.

* Bound to a non-loopback host, every request needs the token printed at start (the `X-Loraforge-Token` header,
  the `loraforge_token` cookie, or `?token=` once in the URL, which sets the cookie).
* The Host header must name the bound address (or localhost), so a web page on another domain cannot reach the
  UI through DNS rebinding; a state-changing request whose Origin is another site is refused.
"""

from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import urlsplit

TOKEN_HEADER = "x-loraforge-token"
TOKEN_COOKIE = "loraforge_token"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_of(header: str) -> str:
    """`127.0.0.1:7860` → `127.0.0.1`; `[::1]:7860` → `::1`."""
    return (urlsplit("//" + header).hostname or "").lower()


def token_ok(given: str | None, token: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())


def install(app, *, token: str | None, allowed_hosts: set[str] | None) -> None:
    """Add the token / Host / Origin checks to a FastAPI app."""
    from fastapi.responses import JSONResponse, RedirectResponse

    @app.middleware("http")
    async def _guard(request, call_next):
        host = host_of(request.headers.get("host", ""))
        if allowed_hosts is not None and host not in allowed_hosts:
            return JSONResponse({"error": f"host {host!r} is not served here (DNS rebinding?)"}, status_code=403)
        origin = request.headers.get("origin")
        if request.method not in ("GET", "HEAD") and origin and host_of(urlsplit(origin).netloc) != host:
            return JSONResponse({"error": "cross-site request refused"}, status_code=403)
        if token:
            query = request.query_params.get("token")
            if request.method == "GET" and token_ok(query, token):
                url = request.url.remove_query_params("token")
                response = RedirectResponse(str(url.path) + (f"?{url.query}" if url.query else ""), status_code=303)
                response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
                return response
            given = request.headers.get(TOKEN_HEADER) or request.cookies.get(TOKEN_COOKIE)
            if not token_ok(given, token):
                return JSONResponse({"error": "a token is needed: open the URL printed by `loraforge webui`"},
                                    status_code=401)
        return await call_next(request)
