"""The queen's HTTP API: jobs (`/v2/tasks`), the pool's state, heartbeats from pool
daemons, Prometheus metrics, and the OpenAI gateway (`/v1`). Handlers parse, call the
runtime (`Queen`) and shape the answer; they decide nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Scope

from rbee_common import __version__
from rbee_common.asgi import (
    BearerAuth,
    HTTPError,
    error_response,
    event_stream,
    presented_token,
    read_model,
    shaped,
    sse,
)
from rbee_common.errors import InvalidRequest, RbeeError
from rbee_keeper.jobs import FINAL_EVENTS, JobRequest, JobState
from rbee_keeper.queen.runtime import JobNotFound, Queen, QueueFull
from rbee_keeper.queen.tokens import heartbeat_sender

COOKIE = "rbee_queen"


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class TaskBody(BaseModel):
    """POST /v2/tasks: a model and a prompt (or chat messages), and sampling settings."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=512)
    prompt: str | None = Field(default=None, min_length=1)
    messages: list[Message] | None = Field(default=None, min_length=1)
    max_tokens: int = Field(default=128, ge=1, le=1_000_000)
    temperature: float = Field(default=0.7, ge=0.0, le=5.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0, le=100_000)
    seed: int | None = Field(default=None, ge=0, lt=2**32)
    stop: list[str] = Field(default_factory=list, max_length=16)

    @model_validator(mode="after")
    def _one_input(self) -> TaskBody:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give a prompt or messages (one of them)")
        return self

    def job(self) -> JobRequest:
        return JobRequest(model=self.model, prompt=self.prompt,
                          messages=tuple((m.role, m.content) for m in self.messages)
                          if self.messages else None,
                          max_tokens=self.max_tokens, temperature=self.temperature,
                          top_p=self.top_p, top_k=self.top_k, seed=self.seed,
                          stop=tuple(self.stop))


class TtlBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttl: float | None = Field(ge=0)


class StopBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str
    id: str


class HeartbeatBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    host: str = Field(min_length=1, max_length=64)
    status: dict[str, Any]


HINT = "See the queen API in DESIGN.md §7."


def queen_of(request: Request) -> Queen:
    return request.app.state.queen  # type: ignore[no-any-return]


def status_for(err: RbeeError) -> int:
    return {"QUEUE_FULL": 429, "JOB_NOT_FOUND": 404, "MODEL_NOT_FOUND": 404,
            "INVALID_MODEL_REF": 400, "INVALID_REQUEST": 400, "UNKNOWN_HOST": 404,
            "WORKER_NOT_FOUND": 404, "WORKER_BUSY": 409, "SCHEMA_MISMATCH": 409,
            "USAGE": 400, "UNAUTHORIZED": 401}.get(err.code, 500)


Handler = Callable[[Request], Awaitable[Response]]


def _guard(fn: Handler) -> Handler:
    async def handler(request: Request) -> Response:
        try:
            return await fn(request)
        except HTTPError as e:
            return error_response(e.err, e.status, e.headers)
        except QueueFull as e:
            return error_response(e, 429, {"Retry-After": str(e.details.get("retry_after", 2))})
        except RbeeError as e:
            return error_response(e, status_for(e))

    return handler


async def health(request: Request) -> Response:
    q = queen_of(request)
    return JSONResponse({"schema": "rbee.queen.health/v1", "status": "ok",
                         "version": __version__, "uptime_s": round(time.time() - q.started, 1)})


def source_of(request: Request) -> str:
    """Where a job came from: "ui" for the web UI's pages (a request borne by the cookie,
    which rbee_keeper.queen.ui.BrowserGate lets through only with the pages' own header),
    else "api"."""
    bearer = request.headers.get("authorization", "").lower().startswith("bearer ")
    return "ui" if not bearer and "x-rbee-ui" in request.headers else "api"


async def submit(request: Request) -> Response:
    body: TaskBody = await read_model(request, TaskBody, hint=HINT)
    q = queen_of(request)
    job = await asyncio.to_thread(q.submit, body.job(), source_of(request))
    return JSONResponse({"schema": "rbee.queen.task/v1", "id": job.id, "state": job.state.value,
                         "events": f"/v2/tasks/{job.id}/events"}, status_code=202)


async def list_tasks(request: Request) -> Response:
    q = queen_of(request)
    states = [s for s in request.query_params.get("state", "").split(",") if s]
    bad = [s for s in states if s not in JobState.__members__]
    if bad:
        raise HTTPError(400, InvalidRequest(f"state {bad[0]!r}: choose from "
                                            f"{', '.join(JobState.__members__)}", field="state"))
    limit = request.query_params.get("limit", "100")
    if not limit.isdigit() or not 1 <= int(limit) <= 1000:
        raise HTTPError(400, InvalidRequest("limit: a number from 1 to 1000", field="limit"))
    rows = await asyncio.to_thread(q.store.jobs, states or None,
                                   request.query_params.get("model") or None, int(limit))
    for row in rows:
        row.pop("request", None)
    return JSONResponse({"schema": "rbee.queen.tasks/v1", "tasks": rows,
                         "counts": await asyncio.to_thread(q.store.counts)})


async def get_task(request: Request) -> Response:
    q = queen_of(request)
    doc = await asyncio.to_thread(q.job_doc, request.path_params["job_id"])
    return JSONResponse({"schema": "rbee.queen.task/v1", **doc})


async def cancel_task(request: Request) -> Response:
    q = queen_of(request)
    doc = await asyncio.to_thread(q.cancel_job, request.path_params["job_id"])
    return JSONResponse({"schema": "rbee.queen.cancel/v1", **doc}, status_code=202)


def _after(request: Request) -> int:
    raw = request.headers.get("last-event-id") or request.query_params.get("after") or "-1"
    try:
        return int(raw)
    except ValueError:
        raise HTTPError(400, InvalidRequest(f"Last-Event-ID {raw!r} is not an event number",
                                            field="Last-Event-ID")) from None


async def job_events(q: Queen, job_id: str, after: int
                     ) -> AsyncIterator[tuple[int, str, dict[str, Any]]]:
    """A job's events after `after`: the past ones, then live ones until its end."""
    job = q.live(job_id)
    if job is None:
        past = await asyncio.to_thread(q.store.events, job_id, after)
        if not past and await asyncio.to_thread(q.store.job, job_id) is None:
            raise JobNotFound(f"no job {job_id!r}")
        for event in past:
            yield event
        return
    events, listener = job.listen(asyncio.get_running_loop(), after)
    try:
        for event in events:
            yield event
            if event[1] in FINAL_EVENTS:
                return
        while True:
            event = await listener.queue.get()
            yield event
            if event[1] in FINAL_EVENTS:
                return
    finally:
        job.unlisten(listener)


async def task_events(request: Request) -> Response:
    q = queen_of(request)
    job_id = request.path_params["job_id"]
    after = _after(request)
    if q.live(job_id) is None and await asyncio.to_thread(q.store.job, job_id) is None:
        raise JobNotFound(f"no job {job_id!r}")

    async def items() -> AsyncIterator[dict[str, Any]]:
        async for seq, name, data in job_events(q, job_id, after):
            yield sse(name, data, seq)

    return event_stream(items())


async def state(request: Request) -> Response:
    return JSONResponse(await asyncio.to_thread(queen_of(request).state_doc))


async def heartbeat(request: Request) -> Response:
    """A pool daemon's state. Its token may be the queen's own or that host's heartbeat token
    (`queen.tokens`), which is good for this route as that host alone."""
    presented = presented_token(request.scope, COOKIE).decode("latin-1")
    sender = heartbeat_sender(presented, request.app.state.token)  # BearerAuth let it in
    body: HeartbeatBody = await read_model(request, HeartbeatBody, hint=HINT)
    await asyncio.to_thread(queen_of(request).heartbeat, body.host, body.status, sender)
    return JSONResponse({"ok": True})


async def models(request: Request) -> Response:
    return JSONResponse(await asyncio.to_thread(queen_of(request).models_doc))


async def set_ttl(request: Request) -> Response:
    body: TtlBody = await read_model(request, TtlBody, hint=HINT)
    model = request.path_params["model"]
    await asyncio.to_thread(queen_of(request).set_ttl, model, body.ttl)
    return JSONResponse({"model": model, "ttl": body.ttl})


async def stop_worker(request: Request) -> Response:
    body: StopBody = await read_model(request, StopBody, hint=HINT)
    doc = await asyncio.to_thread(queen_of(request).stop_worker, body.host, body.id)
    return JSONResponse(doc)


async def metrics(request: Request) -> Response:
    text = await asyncio.to_thread(queen_of(request).metrics_text)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


def routes() -> list[Route]:
    from rbee_keeper.queen import admin, openai_api, ui

    g = _guard
    return [
        Route("/health", health, methods=["GET"]),
        Route("/v2/tasks", g(submit), methods=["POST"]),
        Route("/v2/tasks", g(list_tasks), methods=["GET"]),
        Route("/v2/tasks/{job_id}", g(get_task), methods=["GET"]),
        Route("/v2/tasks/{job_id}/events", g(task_events), methods=["GET"]),
        Route("/v2/tasks/{job_id}/cancel", g(cancel_task), methods=["POST"]),
        Route("/v2/state", g(state), methods=["GET"]),
        Route("/v2/heartbeat", g(heartbeat), methods=["POST"]),
        Route("/v2/models", g(models), methods=["GET"]),
        Route("/v2/models/{model}/ttl", g(set_ttl), methods=["PUT"]),
        Route("/v2/workers/stop", g(stop_worker), methods=["POST"]),
        Route("/metrics", g(metrics), methods=["GET"]),
        Route("/v1/models", openai_api.guard(openai_api.models), methods=["GET"]),
        Route("/v1/models/{model:path}", openai_api.guard(openai_api.model), methods=["GET"]),
        Route("/v1/completions", openai_api.guard(openai_api.completions), methods=["POST"]),
        Route("/v1/chat/completions", openai_api.guard(openai_api.chat), methods=["POST"]),
        *admin.routes(),  # what the web UI needs beyond the jobs API
        *ui.routes(),  # the web UI: `/`, its static files, sign-in and sign-out
    ]


def create_app(queen: Queen, token: str) -> ASGIApp:
    """The queen's ASGI app, its runtime on `app.state.queen`, behind its bearer token."""
    from starlette.exceptions import HTTPException

    from rbee_keeper.queen import ui

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        what = "no such route" if status == 404 else "method not allowed"
        return shaped(request.url.path, InvalidRequest(
            f"{request.method} {request.url.path}: {what}", hint=HINT), status)

    app = Starlette(routes=routes(), exception_handlers={404: not_found, 405: not_found})
    app.state.queen = queen
    app.state.token = token  # the heartbeat route checks its own tokens (see heartbeat)
    # a browser signs in once (ui.py) and sends the token as a cookie from then on
    def heartbeat_token(scope: Scope, presented: bytes) -> bool:
        return scope["path"] == "/v2/heartbeat" and heartbeat_sender(
            presented.decode("latin-1"), token) is not None

    wrapped = BearerAuth(ui.BrowserGate(app, token), token, cookie=COOKIE,
                         open_paths=ui.OPEN_PATHS, reject=ui.reject, also=heartbeat_token)
    wrapped.state = app.state  # type: ignore[attr-defined]
    return wrapped
