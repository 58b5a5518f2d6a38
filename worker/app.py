"""The worker's HTTP app: `create_app(settings, engine)`, its state on `app.state.worker`.

One job at a time (M0): a second /execute gets 503 ALL_SLOTS_BUSY at once; the /v1 routes
wait for the slot first. Where things live: `state` (settings, status, the slot), `jobs`
(running a job in a thread, bridged to asyncio), `routes` (rbee's own routes), `openai_api`
(the /v1 routes), `metrics` (Prometheus text), `rbee_common.asgi` (bodies, errors, SSE,
bearer auth). This module wires them together: every answer, an unknown path or a fault
included, is JSON (OpenAI's error shape under /v1) and counted under its route's one label.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Scope

from rbee_common.asgi import BearerAuth, HTTPError, shaped
from rbee_common.errors import InvalidRequest, RbeeError, Unauthorized
from worker import openai_api, routes
from worker.engine import Engine
from worker.jobs import ClientGone
from worker.state import WorkerSettings, WorkerState

__all__ = ["WorkerSettings", "WorkerState", "create_app"]
log = logging.getLogger("rbee.worker")

Handler = Callable[[Request, WorkerState], Awaitable[Response]]
# path, methods, metrics label, handler: the label is the route's one name in /metrics
ROUTES: list[tuple[str, list[str], str, Handler]] = [
    ("/execute", ["POST"], "execute", routes.execute),
    ("/cancel", ["POST"], "cancel", routes.cancel),
    ("/metrics", ["GET"], "metrics", routes.metrics),
    ("/shutdown", ["POST"], "shutdown", routes.shutdown),
    ("/v1/models", ["GET"], "v1_models", openai_api.v1_models),
    ("/v1/models/{model_id:path}", ["GET"], "v1_model", openai_api.v1_model),
    ("/v1/completions", ["POST"], "v1_completions", openai_api.v1_completions),
    ("/v1/chat/completions", ["POST"], "v1_chat", openai_api.v1_chat),
]
OTHER = "other"  # the label of every path no route serves (a fixed label: a client must not
# grow /metrics by asking for made-up paths)


def label_of(app: Starlette, path: str) -> str:
    """The metrics label of the route that serves `path` (by any method)."""
    for route in app.routes:
        if isinstance(route, Route) and route.path_regex.match(path):
            return str(route.name)
    return OTHER


def _endpoint(label: str, fn: Handler) -> Callable[[Request], Awaitable[Response]]:
    async def handler(request: Request) -> Response:
        state: WorkerState = request.app.state.worker
        path = request.url.path
        try:
            return await fn(request, state)
        except HTTPError as e:
            outcome = ("rejected_busy" if e.status == 503 else
                       "error" if e.status >= 500 else "invalid")
            state.metrics.count(label, outcome)
            return shaped(path, e.err, e.status, e.headers)
        except (ClientGone, ClientDisconnect):  # left before its answer began (mid-body too)
            state.metrics.count(label, "gone")
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        except Exception as e:  # a fault of the worker's own: still a coded, counted answer
            log.exception("%s %s failed", request.method, path)
            state.metrics.count(label, "error")
            return shaped(path, RbeeError(f"the worker failed: {type(e).__name__}: {e}",
                                          hint="Read the worker log."), 500)

    return handler


def create_app(settings: WorkerSettings, engine: Engine) -> ASGIApp:
    """Build the worker's ASGI app; its state lives on `app.state.worker`."""
    table = [Route("/health", routes.health, methods=["GET"], name="health")]
    table += [Route(path, _endpoint(label, fn), methods=methods, name=label)
              for path, methods, label, fn in ROUTES]

    async def no_route(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        what = "no such route" if status == 404 else "method not allowed"
        label = label_of(app, request.url.path)
        app.state.worker.metrics.count(label, "not_found" if status == 404 else "invalid")
        err = InvalidRequest(f"{request.method} {request.url.path}: {what}",
                             hint=routes.API_HINT,
                             openai_code="unknown_url" if status == 404 else None)
        headers = getattr(exc, "headers", None)
        return shaped(request.url.path, err, status, headers)

    app = Starlette(routes=table, exception_handlers={404: no_route, 405: no_route})
    app.state.worker = WorkerState(settings=settings, engine=engine)

    def rejected(path: str) -> None:
        app.state.worker.metrics.count(label_of(app, path), "unauthorized")

    def reject(scope: Scope, reason: str) -> Response:
        return shaped(scope["path"], Unauthorized(reason), 401, {"WWW-Authenticate": "Bearer"})

    wrapped = BearerAuth(app, settings.token, rejected, reject=reject)
    wrapped.state = app.state  # type: ignore[attr-defined]
    return wrapped
