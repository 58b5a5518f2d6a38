"""HTTP plumbing every route shares: reading a JSON body, error responses, SSE framing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from rbee_common.errors import RbeeError
from worker.errors import InvalidRequest


class HTTPError(Exception):
    """Raised inside a route: becomes `status` with the error's JSON envelope."""

    def __init__(self, status: int, err: RbeeError, headers: dict[str, str] | None = None):
        self.status, self.err, self.headers = status, err, headers


def error_response(err: RbeeError, status: int, headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    return JSONResponse(err.envelope(), status_code=status, headers=headers)


async def read_model(request: Request, model: type[BaseModel], limit: int) -> Any:
    """Read a JSON body into `model`: 413 when too large, 400 naming the field at fault."""
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
    except ValueError as e:
        raise HTTPError(400, InvalidRequest(f"the body is not JSON: {e}", field="body")) from e
    if not isinstance(data, dict):
        raise HTTPError(400, InvalidRequest("the body must be a JSON object", field="body"))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise HTTPError(400, InvalidRequest(f"{where}: {first['msg']}", field=where,
                                            hint="See the worker API in DESIGN.md §4.")) from e


def sse(event: str | None, data: Any) -> dict[str, str]:
    """One server-sent event; `data` is JSON-encoded unless it is a string already."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return {"event": event, "data": payload} if event else {"data": payload}


def event_stream(items: AsyncIterator[dict[str, str]]) -> Response:
    """A text/event-stream response that sends `items` as they come."""
    from sse_starlette import EventSourceResponse

    return EventSourceResponse(items, ping=15, headers={"Cache-Control": "no-store"})
