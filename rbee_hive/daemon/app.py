"""The pool daemon's HTTP API. Handlers parse, call the service in a thread, and shape the
answer; they decide nothing. Every route but /health needs the daemon's bearer token.

    GET  /health                      open: is it up
    GET  /v2/state                    the `rbee-hive status` document
    GET  /v2/detect                   `rbee-hive detect`
    GET  /v2/models                   `models list`;  /v2/models/catalog, /v2/models/info?ref=
    POST /v2/models/download          {ref, id?, sha256?, retries?}      progress as SSE
    POST /v2/models/import            {path, id?, copy?}                  progress as SSE
    POST /v2/models/verify            {id}                                progress as SSE
    POST /v2/models/rm                {id, force?}
    GET  /v2/workers                  `worker list`
    POST /v2/workers/start            {backend, model, device, ctx, port, bind, threads,
                                       tensor_split, wait, timeout, token}  progress as SSE
    POST /v2/workers/stop             {id} or {all: true}, timeout?
    GET  /v2/workers/{id}/health      the worker's /health
    GET  /v2/workers/{id}/logs        ?lines=50[&follow=1: `line` events as SSE]
    GET  /v2/workers/{id}/token       its bearer token
    GET  /v2/daemon                   the daemon itself: uptime, watcher, queen link

A long call answers with a text/event-stream when the client accepts one: `phase`,
`progress`, `done`, `log` events, then `result` (the document) or `error` (the envelope and
the exit code the CLI would have used). Otherwise it answers the document when done. An error
answer is the envelope with `exit_code` beside it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from rbee_common import __version__
from rbee_common.asgi import BearerAuth, HTTPError, event_stream, read_model, sse
from rbee_common.errors import InvalidRequest, RbeeError
from rbee_common.names import Backend, ProgressEvent
from rbee_common.progress import Reporter
from rbee_common.spawning import SpawnRequest
from rbee_hive import schemas
from rbee_hive.daemon.service import PoolService

log = logging.getLogger("rbee.hive.daemon")

HINT = "See the pool daemon API in DESIGN.md §7 (and rbee_hive/daemon/app.py)."
PROGRESS_PER_SECOND = 10
Doc = dict[str, Any]


class StartBody(BaseModel):
    """POST /v2/workers/start: `rbee-hive worker spawn` as JSON (the token in the body)."""

    model_config = ConfigDict(extra="forbid")

    backend: Backend
    model: str = Field(min_length=1, max_length=2048)
    device: int | list[int] = 0
    ctx: int | None = Field(default=None, ge=1, le=10_000_000)
    port: int | None = Field(default=None, ge=1, le=65535)
    bind: str | None = Field(default=None, min_length=1, max_length=255)
    threads: int | None = Field(default=None, ge=1, le=4096)
    tensor_split: list[float] | None = None
    rpc: list[str] = Field(default_factory=list, max_length=16)
    wait: bool = True
    timeout: float | None = Field(default=None, gt=0, le=86_400)
    token: str | None = Field(default=None, min_length=16, max_length=512, repr=False)

    def request(self) -> SpawnRequest:
        return SpawnRequest(**self.model_dump(exclude={"token"}))


class StopBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(default=None, min_length=1, max_length=64)
    all: bool = False
    timeout: float = Field(default=10.0, ge=0, le=3600)

    @model_validator(mode="after")
    def _one(self) -> StopBody:
        if self.all == (self.id is not None):
            raise ValueError("give an id or all: true (one of them)")
        return self


class DownloadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ref: str = Field(min_length=1, max_length=2048)
    id: str | None = Field(default=None, min_length=1, max_length=128)
    sha256: str | None = None
    retries: int | None = Field(default=None, ge=0, le=100)


class ImportBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=4096)
    id: str | None = Field(default=None, min_length=1, max_length=128)
    copy_file: bool = Field(default=False, alias="copy")


class IdBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=128)
    force: bool = False


STATUS_OF = {"USAGE": 400, "INVALID_REQUEST": 400, "INVALID_MODEL_REF": 400, "NOT_A_GGUF": 400,
             "WORKER_NOT_FOUND": 404, "MODEL_NOT_FOUND": 404, "MODEL_IN_USE": 409,
             "INSUFFICIENT_VRAM": 409, "INSUFFICIENT_RAM": 409, "NO_FREE_PORT": 409,
             "BACKEND_UNAVAILABLE": 409, "CHECKSUM_MISMATCH": 502, "DOWNLOAD_FAILED": 502}


def failure(err: RbeeError) -> Doc:
    """An error as the daemon sends it: the envelope, and the exit code the CLI would use."""
    return {**err.envelope(), "exit_code": err.exit_code}


def error_json(err: RbeeError, status: int | None = None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.code == "UNAUTHORIZED" else None
    return JSONResponse(failure(err), status_code=status or STATUS_OF.get(err.code, 500),
                        headers=headers)


def internal(e: Exception) -> RbeeError:
    log.exception("internal error")
    return RbeeError(f"internal error in the pool daemon: {type(e).__name__}: {e}",
                     hint="Read the daemon's log (`rbee-hive daemon status` names it).")


def service_of(request: Request) -> PoolService:
    return request.app.state.service  # type: ignore[no-any-return]


Handler = Callable[[Request], Awaitable[Response]]


def _guard(fn: Handler) -> Handler:
    async def handler(request: Request) -> Response:
        try:
            return await fn(request)
        except HTTPError as e:
            return error_json(e.err, e.status)
        except RbeeError as e:
            return error_json(e)
        except Exception as e:
            return error_json(internal(e))

    return handler


async def run(fn: Callable[..., Any], *args: Any) -> Any:
    """A blocking core call, off the event loop."""
    return await asyncio.to_thread(fn, *args)


def wants_events(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "")


async def long_call(request: Request, fn: Callable[[Reporter], Doc]) -> Response:
    """A call that reports progress: as SSE when the client takes it, else its document.

    The work goes on if the client leaves (a download or a load half done is worth
    finishing); the next call finds its result.
    """
    if not wants_events(request):
        return JSONResponse(await run(fn, lambda event: None))
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    last_progress: dict[str, float] = {}

    def report(event: Doc) -> None:
        if event.get("event") == ProgressEvent.progress:
            # a download reports every chunk: ten a second per phase is plenty to draw a bar
            now, phase = time.monotonic(), str(event.get("phase"))
            if now - last_progress.get(phase, 0.0) < 1 / PROGRESS_PER_SECOND:
                return
            last_progress[phase] = now
        loop.call_soon_threadsafe(queue.put_nowait, ("event", event))

    async def work() -> None:
        try:
            queue.put_nowait(("result", await run(fn, report)))
        except RbeeError as e:
            queue.put_nowait(("error", e))
        except Exception as e:
            queue.put_nowait(("error", internal(e)))

    task = asyncio.create_task(work())
    request.app.state.tasks.add(task)
    task.add_done_callback(request.app.state.tasks.discard)

    async def items() -> AsyncIterator[dict[str, Any]]:
        while True:
            kind, item = await queue.get()
            if kind == "event":
                yield sse(str(item.get("event")), item)
            elif kind == "result":
                yield sse(ProgressEvent.result, item)
                return
            else:
                yield sse(ProgressEvent.error, failure(item))
                return

    return event_stream(items())


def _query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise HTTPError(400, InvalidRequest(f"{name}: a number from {low} to {high}",
                                            field=name))
    return int(raw)


# routes

async def health(request: Request) -> Response:
    return JSONResponse({"schema": schemas.DAEMON_HEALTH, "status": "ok",
                         "version": __version__,
                         "uptime_s": round(time.time() - request.app.state.started, 1)})


async def daemon_info(request: Request) -> Response:
    info: Callable[[], Doc] = request.app.state.info
    return JSONResponse({"schema": schemas.DAEMON_HEALTH, "status": "ok",
                         "version": __version__,
                         "uptime_s": round(time.time() - request.app.state.started, 1),
                         **info()})


async def state(request: Request) -> Response:
    return JSONResponse(await run(service_of(request).state))


async def detect(request: Request) -> Response:
    return JSONResponse(await run(service_of(request).detect))


async def catalog(request: Request) -> Response:
    return JSONResponse(await run(service_of(request).catalog))


async def models(request: Request) -> Response:
    return JSONResponse(await run(service_of(request).models))


async def model_info(request: Request) -> Response:
    ref = request.query_params.get("ref")
    if not ref:
        raise HTTPError(400, InvalidRequest("ref: give the model reference", field="ref"))
    ctx = _query_int(request, "ctx", 0, 1, 10_000_000) or None
    return JSONResponse(await run(service_of(request).model_info, ref, ctx))


async def download(request: Request) -> Response:
    body: DownloadBody = await read_model(request, DownloadBody, hint=HINT)
    svc = service_of(request)
    return await long_call(request, lambda report: svc.download(
        body.ref, body.id, body.sha256, body.retries, report))


async def import_model(request: Request) -> Response:
    body: ImportBody = await read_model(request, ImportBody, hint=HINT)
    path = Path(body.path)
    if not path.is_absolute():
        raise HTTPError(400, InvalidRequest("path: give an absolute path on this host",
                                            field="path"))
    svc = service_of(request)
    return await long_call(request, lambda report: svc.import_model(
        path, body.id, body.copy_file, report))


async def verify(request: Request) -> Response:
    body: IdBody = await read_model(request, IdBody, hint=HINT)
    svc = service_of(request)
    return await long_call(request, lambda report: svc.verify(body.id, report))


async def remove(request: Request) -> Response:
    body: IdBody = await read_model(request, IdBody, hint=HINT)
    return JSONResponse(await run(service_of(request).remove, body.id, body.force))


async def workers(request: Request) -> Response:
    return JSONResponse(await run(service_of(request).workers))


async def start_worker(request: Request) -> Response:
    body: StartBody = await read_model(request, StartBody, hint=HINT)
    svc, req = service_of(request), body.request()
    return await long_call(request, lambda report: svc.spawn(req, body.token, report))


async def stop_worker(request: Request) -> Response:
    body: StopBody = await read_model(request, StopBody, hint=HINT)
    svc = service_of(request)
    if body.all:
        return JSONResponse(await run(svc.stop_all, body.timeout))
    return JSONResponse(await run(svc.stop, body.id, body.timeout))


async def worker_health(request: Request) -> Response:
    return JSONResponse(await run(service_of(request).worker_health,
                                  request.path_params["wid"]))


async def worker_token(request: Request) -> Response:
    return JSONResponse(await run(service_of(request).worker_token, request.path_params["wid"]))


async def worker_logs(request: Request) -> Response:
    wid = request.path_params["wid"]
    lines = _query_int(request, "lines", 50, 0, 1_000_000)
    if request.query_params.get("follow") not in ("1", "true"):
        return JSONResponse(await run(service_of(request).worker_logs, wid, lines))
    from rbee_hive.daemon.logs import follow
    from rbee_hive.registry import Registry

    await run(Registry().get, wid)  # WORKER_NOT_FOUND as a 404, before the stream starts

    async def items() -> AsyncIterator[dict[str, Any]]:
        async for line in follow(wid, lines):
            yield sse(ProgressEvent.line, {"line": line})

    return event_stream(items())


def routes() -> list[Route]:
    g = _guard
    return [
        Route("/health", health, methods=["GET"]),
        Route("/v2/daemon", g(daemon_info), methods=["GET"]),
        Route("/v2/state", g(state), methods=["GET"]),
        Route("/v2/detect", g(detect), methods=["GET"]),
        Route("/v2/models", g(models), methods=["GET"]),
        Route("/v2/models/catalog", g(catalog), methods=["GET"]),
        Route("/v2/models/info", g(model_info), methods=["GET"]),
        Route("/v2/models/download", g(download), methods=["POST"]),
        Route("/v2/models/import", g(import_model), methods=["POST"]),
        Route("/v2/models/verify", g(verify), methods=["POST"]),
        Route("/v2/models/rm", g(remove), methods=["POST"]),
        Route("/v2/workers", g(workers), methods=["GET"]),
        Route("/v2/workers/start", g(start_worker), methods=["POST"]),
        Route("/v2/workers/stop", g(stop_worker), methods=["POST"]),
        Route("/v2/workers/{wid}/health", g(worker_health), methods=["GET"]),
        Route("/v2/workers/{wid}/logs", g(worker_logs), methods=["GET"]),
        Route("/v2/workers/{wid}/token", g(worker_token), methods=["GET"]),
    ]


def create_app(service: PoolService, token: str, info: Callable[[], Doc] = dict,
               threads: int = 32) -> ASGIApp:
    """The daemon's ASGI app, its service on `app.state.service`, behind its bearer token."""
    from starlette.exceptions import HTTPException

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        what = "no such route" if status == 404 else "method not allowed"
        return error_json(InvalidRequest(f"{request.method} {request.url.path}: {what}",
                                         hint=HINT), status)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # the default pool has cpu+4 threads: a few slow loads must not starve /v2/state
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hive")
        loop.set_default_executor(executor)
        yield

    app = Starlette(routes=routes(), exception_handlers={404: not_found, 405: not_found},
                    lifespan=lifespan)
    app.state.service = service
    app.state.info = info
    app.state.started = time.time()
    app.state.tasks = set()

    quiet = {"until": 0.0, "count": 0}

    def rejected(path: str) -> None:
        """Say so, but at most once a minute (any client on the LAN can knock), and the path
        as a quoted literal: it is the client's text, and a forged log line is not ours."""
        now = time.monotonic()
        if now < quiet["until"]:
            quiet["count"] += 1
            return
        more = f" ({quiet['count']} more in the last minute)" if quiet["count"] else ""
        quiet.update(until=now + 60.0, count=0)
        log.warning("refused a request to %r: missing or wrong bearer token%s", path[:100], more)

    return BearerAuth(app, token, on_reject=rejected,
                      reject=lambda scope, reason: error_json(_unauthorized(reason), 401))


def _unauthorized(reason: str) -> RbeeError:
    from rbee_common.errors import Unauthorized

    return Unauthorized(reason, hint="Send `Authorization: Bearer <token>`; "
                                     "`rbee-hive daemon token` on the host prints it.")
