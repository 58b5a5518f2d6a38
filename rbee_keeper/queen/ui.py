"""The queen's web UI: the page at `/`, its static files (shipped in the package, nothing
fetched from elsewhere), and the browser's sign-in.

A browser signs in once by posting the queen's token in a form body (never in a URL); the
answer sets it as an HttpOnly, SameSite=Strict cookie, which `BearerAuth` accepts like an
Authorization header. API clients keep using `Authorization: Bearer`. Because a browser
attaches the cookie by itself, `BrowserGate` refuses a state-changing request that rides on
the cookie unless it comes from the queen's own pages (its Origin, and a header no
cross-site form can send).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import hmac
import html
import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from rbee_common.asgi import error_response, presented_token, shaped
from rbee_common.errors import InvalidRequest, RbeeError, Unauthorized
from rbee_keeper.queen.app import COOKIE  # the cookie BearerAuth reads the token from

log = logging.getLogger("rbee.queen")

STATIC = Path(__file__).parent / "static"
COOKIE_MAX_AGE = 30 * 24 * 3600
CSRF_HEADER = b"x-rbee-ui"  # the page's fetch() sends it; a cross-site form cannot
SIGNIN, SIGNOUT, SESSION = "/signin", "/signout", "/session"
# what a browser may load before it has signed in: the sign-in page and what it uses
OPEN_PATHS = frozenset({"/health", SIGNIN, SIGNOUT, SESSION, "/favicon.ico",
                        "/static/style.css", "/static/signin.js", "/static/favicon.svg"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
WRONG_TOKEN_DELAY_S = 0.5  # slows guessing; the token itself is 256 bits
SIGNIN_BODY_LIMIT = 4096

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make POSTs say Origin: null
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


class CrossSiteRefused(RbeeError):
    """A request that rode on the browser's cookie without coming from the queen's pages."""

    code = "FORBIDDEN"
    default_hint = "Use the queen's web UI, or send Authorization: Bearer <token>."


# spelled out rather than guessed from the system's mime.types: module scripts need a
# JavaScript type
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
               ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml",
               ".png": "image/png"}


@dataclass(frozen=True)
class Asset:
    body: bytes
    gzipped: bytes
    etag: str
    media_type: str


_assets: dict[str, tuple[float, Asset]] = {}


def asset(name: str) -> Asset | None:
    """A static file with its gzip form and an ETag, read again only when it changed (an
    editable install picks up an edit); None if there is no such file."""
    path = (STATIC / name).resolve()
    if STATIC.resolve() not in path.parents or not path.is_file():
        return None
    mtime = path.stat().st_mtime
    cached = _assets.get(name)
    if cached is not None and cached[0] == mtime:
        return cached[1]
    body = path.read_bytes()
    media = MEDIA_TYPES.get(path.suffix, "application/octet-stream")
    found = Asset(body, gzip.compress(body, 9, mtime=0),
                  '"' + hashlib.sha256(body).hexdigest()[:20] + '"', media)
    _assets[name] = (mtime, found)
    return found


def send_asset(request: Request, name: str, status: int = 200,
               body: bytes | None = None) -> Response:
    """A static file (or `body` in its place), gzipped when the browser takes it, 304 when
    it has it already."""
    found = asset(name)
    if found is None:
        return error_response(InvalidRequest(f"no file {name!r}"), 404)
    headers = dict(SECURITY_HEADERS)
    if body is None:
        headers["ETag"] = found.etag
        if request.headers.get("if-none-match") == found.etag and status == 200:
            return Response(status_code=304, headers=headers)
        gz = "gzip" in request.headers.get("accept-encoding", "")
        body = found.gzipped if gz else found.body
        if gz:
            headers["Content-Encoding"] = "gzip"
        headers["Vary"] = "Accept-Encoding"
    return Response(body, status_code=status, media_type=found.media_type, headers=headers)


async def index(request: Request) -> Response:
    return send_asset(request, "index.html")


async def static(request: Request) -> Response:
    return send_asset(request, request.path_params["name"])


async def favicon(request: Request) -> Response:
    return send_asset(request, "favicon.svg")


def signin_page(request: Request, message: str = "", status: int = 200) -> Response:
    """The sign-in form; `message` is one of this module's own sentences, escaped anyway."""
    found = asset("signin.html")
    assert found is not None
    text = found.body.decode()
    if message:
        text = text.replace('<p id="message" class="message" hidden></p>',
                            f'<p id="message" class="message" role="alert">'
                            f'{html.escape(message)}</p>')
    return send_asset(request, "signin.html", status, text.encode())


async def signin_form(request: Request) -> Response:
    return signin_page(request)


def reject(scope: Scope, reason: str) -> Response:
    """Without the token: a browser asking for a page goes to the sign-in form; anything
    else gets 401 with the error envelope."""
    headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
    page = scope["method"] == "GET" and scope["path"] == "/" and \
        "text/html" in headers.get("accept", "")
    if page:
        return RedirectResponse(SIGNIN, status_code=303, headers={"Cache-Control": "no-store"})
    return shaped(scope["path"], Unauthorized(reason, hint="Sign in at / with `rbee queen token`, "
                                                          "or send Authorization: Bearer <token>."),
                  401, {"WWW-Authenticate": "Bearer"})


def _same_origin(origin: str, headers: dict[str, str]) -> bool:
    """Does an Origin (or Referer) name this very queen, as the browser reached it?"""
    netloc = urlsplit(origin).netloc
    hosts = {headers.get("host", ""), headers.get("x-forwarded-host", "")} - {""}
    return bool(netloc) and netloc in hosts


def _secure(headers: dict[str, str], scope: Scope) -> bool:
    return scope.get("scheme") == "https" or headers.get("x-forwarded-proto") == "https"


class BrowserGate:
    """Where a browser gets its cookie (POST /signin, /signout), and what the cookie may
    not do: a state-changing request that carries no Authorization header must come from
    the queen's own pages — a matching Origin, and the UI's header (a cross-site page
    cannot send it without a CORS preflight, which the queen never grants)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == SESSION:
            signed_in = hmac.compare_digest(presented_token(scope, COOKIE), self.token)
            await JSONResponse({"signed_in": signed_in}, headers={"Cache-Control": "no-store"})(
                scope, receive, send)
            return
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope["headers"]}
        path, method = scope["path"], scope["method"]
        origin = headers.get("origin") or headers.get("referer") or ""
        if headers.get("authorization", "").lower().startswith("bearer ") and \
                path not in (SIGNIN, SIGNOUT):
            await self.app(scope, receive, send)  # an API client: its header is its proof
            return
        if origin and not _same_origin(origin, headers):
            await self._refuse(scope, receive, send, f"a request from {origin!r} to {path}")
        elif method == "POST" and path == SIGNIN:
            await (await self._signin(scope, receive, headers))(scope, receive, send)
        elif method == "POST" and path == SIGNOUT:
            if origin:  # every browser sends one with a form post
                await self._signout(scope, headers)(scope, receive, send)
            else:
                await self._refuse(scope, receive, send, "a sign-out with no Origin")
        elif CSRF_HEADER.decode() not in headers:
            await self._refuse(scope, receive, send, f"{method} {path} without the "
                               f"{CSRF_HEADER.decode()} header")
        else:
            await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, what: str) -> None:
        err = CrossSiteRefused(f"refused {what}: only the queen's own pages may change "
                               "things with the sign-in cookie")
        await error_response(err, 403)(scope, receive, send)

    async def _signin(self, scope: Scope, receive: Receive,
                      headers: dict[str, str]) -> Response:
        request = Request(scope, receive)
        body = b""
        async for chunk in request.stream():  # unauthenticated: read a little, no more
            body += chunk
            if len(body) > SIGNIN_BODY_LIMIT:
                return signin_page(request, "That is too long to be a token.", 413)
        fields = parse_qs(body.decode("utf-8", "replace"))
        presented = (fields.get("token") or [""])[0].strip().encode()
        if not presented or not hmac.compare_digest(presented, self.token):
            client = scope.get("client") or ("?", 0)
            log.warning("refused a sign-in with a wrong token from %s", client[0])
            await asyncio.sleep(WRONG_TOKEN_DELAY_S)
            return signin_page(request, "That is not this queen's token.", 401)
        response = RedirectResponse("/", status_code=303, headers={"Cache-Control": "no-store"})
        response.set_cookie(COOKIE, self.token.decode(), max_age=COOKIE_MAX_AGE, path="/",
                            httponly=True, samesite="strict", secure=_secure(headers, scope))
        return response

    def _signout(self, scope: Scope, headers: dict[str, str]) -> Response:
        response = RedirectResponse(SIGNIN, status_code=303, headers={"Cache-Control": "no-store"})
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict",
                               secure=_secure(headers, scope))
        return response


def routes() -> list[Route]:
    return [
        Route("/", index, methods=["GET"]),
        Route(SIGNIN, signin_form, methods=["GET"]),
        Route("/favicon.ico", favicon, methods=["GET"]),
        Route("/static/{name:path}", static, methods=["GET"]),
    ]

