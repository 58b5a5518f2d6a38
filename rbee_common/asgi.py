"""HTTP server plumbing every rbee server shares (the worker, the pool daemon, the queen):
bearer auth, JSON bodies read into pydantic models, coded error responses, SSE framing.

Imports starlette and pydantic: servers only, never a CLI hot path.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from rbee_common.errors import InvalidRequest, RbeeError, Unauthorized

MAX_BODY_BYTES = 1024 * 1024
MAX_JSON_DEPTH = 64  # deeper bodies are refused: no rbee route takes them, and parsing or
# validating them would recurse toward Python's limit


class HTTPError(Exception):
    """Raised inside a route: becomes `status` with the error's JSON envelope."""

    def __init__(self, status: int, err: RbeeError, headers: dict[str, str] | None = None):
        super().__init__(err.message)
        self.status, self.err, self.headers = status, err, headers


def error_response(err: RbeeError, status: int, headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    """The error as rbee's JSON envelope (DESIGN.md §5)."""
    return JSONResponse(err.envelope(), status_code=status, headers=headers)


def openai_error(err: RbeeError, status: int, headers: dict[str, str] | None = None
                 ) -> JSONResponse:
    """The error in OpenAI's shape, rbee's code and hint beside it (for /v1 routes)."""
    from rbee_common.openai_errors import openai_body

    return JSONResponse(openai_body(err, status), status_code=status, headers=headers)


def is_openai(path: str) -> bool:
    """Whether the path is under /v1, where clients read OpenAI's error shape."""
    return path == "/v1" or path.startswith("/v1/")


def shaped(path: str, err: RbeeError, status: int, headers: dict[str, str] | None = None
           ) -> JSONResponse:
    """The error as the route's clients read errors: OpenAI's shape under /v1, rbee's
    envelope elsewhere."""
    if is_openai(path):
        return openai_error(err, status, headers)
    return error_response(err, status, headers)


def json_fault(data: Any, limit: int = MAX_JSON_DEPTH) -> str | None:
    """What makes parsed JSON unfit for a route, or None: nesting deeper than `limit`, or a
    string with a lone surrogate (JSON's \\ud800 escapes parse to one, and it can never be
    encoded again: not for the model, not in an answer). Walked without recursion."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return f"the body nests deeper than {limit} levels"
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, child in items:
            for text in (key, child):
                if isinstance(text, str) and not text.isascii():
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:
                        return "the body holds a string that is not valid Unicode (a lone " \
                               "surrogate escape)"
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return None


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """A JSON object body: 413 when too large, 400 when not a JSON object."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, InvalidRequest(f"the body is {declared} bytes; the limit is {limit}",
                                            hint="Send a shorter prompt."))
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPError(413, InvalidRequest(f"the body exceeds {limit} bytes",
                                                hint="Send a shorter prompt."))
    try:
        data = json.loads(body or b"null")
    except RecursionError as e:
        raise HTTPError(400, InvalidRequest(
            f"the body nests deeper than {MAX_JSON_DEPTH} levels", field="body")) from e
    except ValueError as e:
        raise HTTPError(400, InvalidRequest(f"the body is not JSON: {e}", field="body")) from e
    if not isinstance(data, dict):
        raise HTTPError(400, InvalidRequest("the body must be a JSON object", field="body"))
    fault = json_fault(data)
    if fault is not None:
        raise HTTPError(400, InvalidRequest(fault, field="body"))
    return data


def validate(model: type[BaseModel], data: dict[str, Any], hint: str = "") -> Any:
    """`data` as `model`; 400 naming the first field at fault."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        kind = first["type"]
        message = ("not a field this route takes" if kind == "extra_forbidden" else
                   first["msg"].removeprefix("Value error, "))
        # OpenAI's codes for the two: an unknown field, a field that cannot be honoured
        openai_code = {"extra_forbidden": "unknown_parameter",
                  "unsupported_parameter": "unsupported_parameter"}.get(kind)
        raise HTTPError(400, InvalidRequest(f"{where}: {message}", field=where, hint=hint,
                                            openai_code=openai_code)) from e


async def read_model(request: Request, model: type[BaseModel], limit: int = MAX_BODY_BYTES,
                     hint: str = "") -> Any:
    """Read a JSON body into `model` (413 too large, 400 naming the field at fault)."""
    return validate(model, await read_body(request, limit), hint)


def sse(event: str | None, data: Any, event_id: int | None = None) -> dict[str, Any]:
    """One server-sent event; `data` is JSON-encoded unless it is a string already."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    out: dict[str, Any] = {"data": payload}
    if event:
        out["event"] = event
    if event_id is not None:
        out["id"] = str(event_id)
    return out


def event_stream(items: AsyncIterator[dict[str, Any]]) -> Response:
    """A text/event-stream response that sends `items` as they come."""
    from sse_starlette import EventSourceResponse

    return EventSourceResponse(items, ping=15, headers={"Cache-Control": "no-store",
                                                        "X-Accel-Buffering": "no"})


def presented_token(scope: Scope, cookie: str | None = None) -> bytes:
    """The bearer token of a request: its Authorization header, else (for a browser) the
    named cookie."""
    header = b""
    cookies = b""
    for name, value in scope["headers"]:
        if name == b"authorization":
            header = value
        elif name == b"cookie":
            cookies = value
    scheme, _, presented = header.partition(b" ")
    if scheme.lower() == b"bearer":
        return presented.strip()
    if cookie and cookies:
        for part in cookies.split(b";"):
            key, _, value = part.strip().partition(b"=")
            if key == cookie.encode():
                return value.strip()
    return b""


class BearerAuth:
    """Every route but the open ones needs the bearer token, compared in constant time."""

    def __init__(self, app: ASGIApp, token: str, on_reject: Callable[[str], None] | None = None,
                 open_paths: frozenset[str] = frozenset({"/health"}),
                 cookie: str | None = None,
                 reject: Callable[[Scope, str], Response] | None = None,
                 also: Callable[[Scope, bytes], bool] | None = None) -> None:
        self.app = app
        self.token = token.encode()
        self.on_reject = on_reject
        self.open_paths = open_paths
        self.cookie = cookie
        self.reject = reject
        self.also = also  # another token a route may take (the queen's heartbeat tokens)

    def allowed(self, scope: Scope) -> bool:
        presented = presented_token(scope, self.cookie)
        return bool(presented) and (hmac.compare_digest(presented, self.token) or (
            self.also is not None and self.also(scope, presented)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths or self.allowed(scope):
            await self.app(scope, receive, send)
            return
        if self.on_reject is not None:
            self.on_reject(scope["path"])
        has = any(name == b"authorization" for name, _ in scope["headers"])
        reason = "wrong bearer token" if has else "missing bearer token"
        response = (self.reject(scope, reason) if self.reject is not None else
                    error_response(Unauthorized(reason), 401, {"WWW-Authenticate": "Bearer"}))
        await response(scope, receive, send)
