"""The worker's HTTP app: `create_app(settings, engine)`, its state on `app.state.worker`.

One job at a time (M0): a second job gets 503 ALL_SLOTS_BUSY. Where things live:
`state` (settings, status, the slot), `jobs` (running a job in a thread, bridged to asyncio),
`routes` (rbee's own routes), `openai_api` (the /v1 routes), `metrics` (Prometheus text),
`rbee_common.asgi` (bodies, errors, SSE, bearer auth). This module wires them together.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from rbee_common.asgi import BearerAuth, HTTPError, error_response
from worker import openai_api, routes
from worker.engine import Engine
from worker.state import WorkerSettings, WorkerState

__all__ = ["WorkerSettings", "WorkerState", "create_app"]


def _endpoint(route: str, fn: Callable[[Request, WorkerState], Awaitable[Response]]
              ) -> Callable[[Request], Awaitable[Response]]:
    async def handler(request: Request) -> Response:
        state: WorkerState = request.app.state.worker
        try:
            return await fn(request, state)
        except HTTPError as e:
            state.metrics.count(route, "rejected_busy" if e.status == 503 else "invalid")
            return error_response(e.err, e.status, e.headers)

    return handler


def create_app(settings: WorkerSettings, engine: Engine) -> ASGIApp:
    """Build the worker's ASGI app; its state lives on `app.state.worker`."""
    table = [
        Route("/health", routes.health, methods=["GET"]),
        Route("/execute", _endpoint("execute", routes.execute), methods=["POST"]),
        Route("/cancel", _endpoint("cancel", routes.cancel), methods=["POST"]),
        Route("/metrics", _endpoint("metrics", routes.metrics), methods=["GET"]),
        Route("/shutdown", _endpoint("shutdown", routes.shutdown), methods=["POST"]),
        Route("/v1/models", _endpoint("v1_models", openai_api.v1_models), methods=["GET"]),
        Route("/v1/completions", _endpoint("v1_completions", openai_api.v1_completions),
              methods=["POST"]),
        Route("/v1/chat/completions", _endpoint("v1_chat", openai_api.v1_chat),
              methods=["POST"]),
    ]
    app = Starlette(routes=table)
    app.state.worker = WorkerState(settings=settings, engine=engine)

    def rejected(path: str) -> None:
        app.state.worker.metrics.count(path.strip("/").replace("/", "_") or "root",
                                       "unauthorized")

    wrapped = BearerAuth(app, settings.token, rejected)
    wrapped.state = app.state  # type: ignore[attr-defined]
    return wrapped
