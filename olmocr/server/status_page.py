"""The status service's page: ``GET /`` (a live view of every server), its assets, and the sign-in.

The page (``olmocr/server/page/``: HTML, CSS and a script with no library) is served by the service
itself, so it works on machines with no internet. It opens ``/ws`` and redraws on every message.

A browser cannot put an ``Authorization`` header on a WebSocket, so where the service requires its
bearer token (``OLMOCR_STATUS_TOKEN``/``_FILE``) the page signs in once and then uses a cookie:

- ``/login`` shows a form; posting the token there (or opening ``/?token=TOKEN`` once, e.g. from a
  script) sets the cookie ``olmocr_status`` and redirects to ``/`` (the token leaves the address bar);
- the cookie holds an HMAC of the token, not the token itself; it is ``HttpOnly`` and
  ``SameSite=Strict``; with it, ``/``, ``/status``, ``/metrics`` and ``/ws`` are allowed, as with the header;
- a WebSocket authorised by the cookie must come from the service's own page (its ``Origin`` is the
  service's address), so another site open in the same browser cannot read the status.

Changing the token invalidates every cookie. Without a token (loopback only) nothing is asked.
"""

from __future__ import annotations

import hashlib
import hmac
import html
from collections.abc import Awaitable, Callable
from importlib import resources
from urllib.parse import urlsplit

from aiohttp import web

COOKIE = "olmocr_status"
ASSETS = {"status.css": "text/css", "status.js": "text/javascript"}
_PUBLIC = ("/login", "/assets/")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def asset(name: str) -> bytes:
    return resources.files("olmocr.server").joinpath("page", name).read_bytes()


def session_value(token: str) -> str:
    """The cookie's value for ``token`` (an HMAC: a copied cookie does not reveal the token)."""
    return hmac.new(token.encode(), b"olmocr status page session", hashlib.sha256).hexdigest()


def _same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not a browser
    return urlsplit(origin).netloc.lower() == request.host.lower()


def auth_middleware(token: str | None, open_paths: frozenset[str] = frozenset()
                    ) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """The bearer token (header) or the page's cookie on every endpoint but the sign-in, the assets and
    ``open_paths`` (exact paths: the one-line health probes, as in olmocr.endpoints.bearer_middleware)."""
    bearer = f"Bearer {token}".encode() if token else b""
    cookie = session_value(token).encode() if token else b""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not token or request.path.startswith(_PUBLIC) or request.path in open_paths:
            return await handler(request)
        if hmac.compare_digest(request.headers.get("Authorization", "").encode(), bearer):
            return await handler(request)
        if hmac.compare_digest(request.cookies.get(COOKIE, "").encode(), cookie):
            if request.path == "/ws" and not _same_origin(request):
                return web.json_response({"error": "WebSocket from another site refused"}, status=403)
            return await handler(request)
        given = request.query.get("token")
        if request.path == "/" and given is not None:
            if hmac.compare_digest(given.encode(), token.encode()):
                return _signed_in(token)
            return _login_page("That token is wrong.", status=401)
        if request.path == "/" and "text/html" in request.headers.get("Accept", ""):
            return _login_page(status=401)
        return web.json_response({"error": "missing or wrong bearer token"}, status=401,
                                 headers={"WWW-Authenticate": "Bearer"})

    return check


def _signed_in(token: str) -> web.Response:
    response = web.Response(status=303, headers={"Location": "/", "Cache-Control": "no-store"})
    response.set_cookie(COOKIE, session_value(token), httponly=True, samesite="Strict", path="/")
    return response


def _login_page(message: str = "", status: int = 200) -> web.Response:
    note = f'<p class="error">{html.escape(message)}</p>' if message else ""
    body = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>olmocr status: sign in</title>
<link rel="stylesheet" href="/assets/status.css"></head><body><main class="login">
<h1>olmocr status</h1>{note}
<p>This status service requires its token (the value of <code>OLMOCR_STATUS_TOKEN</code> or of the file
<code>OLMOCR_STATUS_TOKEN_FILE</code> names).</p>
<form method="post" action="/login"><label>Token <input type="password" name="token" autocomplete="current-password"
required autofocus></label> <button type="submit">Sign in</button></form></main></body></html>"""
    return web.Response(text=body, content_type="text/html", status=status,
                        headers={"WWW-Authenticate": "Bearer", "Cache-Control": "no-store"})


def add_routes(app: web.Application, token: str | None) -> None:
    async def index(_request: web.Request) -> web.Response:
        return web.Response(body=asset("index.html"), content_type="text/html",
                            headers={"Cache-Control": "no-cache"})

    async def assets(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ASSETS:
            raise web.HTTPNotFound()
        return web.Response(body=asset(name), content_type=ASSETS[name], headers={"Cache-Control": "no-cache"})

    async def login_form(_request: web.Request) -> web.Response:
        if not token:
            raise web.HTTPSeeOther("/")
        return _login_page()

    async def login(request: web.Request) -> web.Response:
        if not token:
            raise web.HTTPSeeOther("/")
        given = str((await request.post()).get("token", "")).strip()
        if hmac.compare_digest(given.encode(), token.encode()):
            return _signed_in(token)
        return _login_page("That token is wrong.", status=401)

    app.router.add_get("/", index)
    app.router.add_get("/assets/{name}", assets)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
