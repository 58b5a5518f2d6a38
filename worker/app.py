"""The worker's HTTP app: `create_app(settings, engine)`, its state on `app.state.worker`.

One job at a time (M0): a second job gets 503 ALL_SLOTS_BUSY. The generation loop runs in
a thread and feeds an asyncio queue; the SSE stream reads it. A cancel flag stops the loop:
POST /cancel sets it, and so does a client that goes away (the stream's `finally`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from rbee_common.errors import RbeeError
from worker.engine import Engine, GenParams, GenResult
from worker.errors import AllSlotsBusy, InvalidRequest, Unauthorized, WorkerLoading
from worker.schemas import (
    HEALTH_SCHEMA,
    MAX_BODY_BYTES,
    CancelRequest,
    ChatCompletionRequest,
    CompletionRequest,
    ExecuteRequest,
    HealthStatus,
    StopReason,
    stop_list,
)

log = logging.getLogger("rbee.worker")


@dataclass(frozen=True)
class WorkerSettings:
    worker_id: str
    model_id: str
    backend: str
    device: int
    ctx: int
    token: str = field(repr=False)
    max_body_bytes: int = MAX_BODY_BYTES


@dataclass
class Job:
    id: str
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


@dataclass
class Metrics:
    requests: dict[tuple[str, str], int] = field(default_factory=dict)
    tokens_generated: int = 0
    ttft_sum_s: float = 0.0
    ttft_count: int = 0
    last_tokens_per_sec: float = 0.0

    def count(self, route: str, outcome: str) -> None:
        self.requests[(route, outcome)] = self.requests.get((route, outcome), 0) + 1

    def record(self, result: GenResult) -> None:
        self.tokens_generated += result.tokens_out
        if result.tokens_out:
            self.ttft_sum_s += result.ttft_ms / 1000
            self.ttft_count += 1
        if result.tokens_per_sec:
            self.last_tokens_per_sec = result.tokens_per_sec


@dataclass
class WorkerState:
    settings: WorkerSettings
    engine: Engine
    status: HealthStatus = HealthStatus.loading
    error: RbeeError | None = None
    started: float = field(default_factory=time.monotonic)
    slot: threading.Lock = field(default_factory=threading.Lock)
    job: Job | None = None
    metrics: Metrics = field(default_factory=Metrics)
    request_exit: Callable[[], None] = lambda: None
    _vram: tuple[float, int] = (0.0, 0)

    def vram_bytes(self) -> int:
        """GPU memory this worker holds (CUDA, via NVML; re-read at most once a second)."""
        if self.settings.backend != "cuda" or self.engine.llama is None:
            return 0
        at, value = self._vram
        if time.monotonic() - at > 1.0:
            from worker.engine import cuda_memory_of

            value = cuda_memory_of(os.getpid(), self.settings.device)
            self._vram = (time.monotonic(), value)
        return value

    def cancel_current(self) -> None:
        job = self.job
        if job is not None:
            job.cancel.set()


def error_response(err: RbeeError, status: int, headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    return JSONResponse(err.envelope(), status_code=status, headers=headers)


class BearerAuth:
    """Every route but /health needs `Authorization: Bearer <token>` (constant-time compare)."""

    def __init__(self, app: ASGIApp, token: str, on_reject: Callable[[str], None]) -> None:
        self.app = app
        self.token = token.encode()
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        header = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value
                break
        scheme, _, presented = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(presented.strip(), self.token):
            await self.app(scope, receive, send)
            return
        self.on_reject(scope["path"])
        reason = "wrong bearer token" if header else "missing bearer token"
        response = error_response(Unauthorized(reason), 401, {"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


async def read_model(request: Request, model: type[BaseModel], limit: int) -> Any:
    """Read a JSON body into `model`: 413 when too large, 400 naming the field at fault."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _HTTPError(413, InvalidRequest(f"the body is {declared} bytes; the limit is {limit}",
                                             hint="Send a shorter prompt."))
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _HTTPError(413, InvalidRequest(f"the body exceeds {limit} bytes",
                                                 hint="Send a shorter prompt."))
    try:
        data = json.loads(body or b"null")
    except ValueError as e:
        raise _HTTPError(400, InvalidRequest(f"the body is not JSON: {e}", field="body")) from e
    if not isinstance(data, dict):
        raise _HTTPError(400, InvalidRequest("the body must be a JSON object", field="body"))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise _HTTPError(400, InvalidRequest(f"{where}: {first['msg']}", field=where,
                                             hint="See the worker API in DESIGN.md §4.")) from e


class _HTTPError(Exception):
    def __init__(self, status: int, err: RbeeError, headers: dict[str, str] | None = None):
        self.status, self.err, self.headers = status, err, headers


def _endpoint(route: str, fn: Callable[[Request, WorkerState], Awaitable[Response]]
              ) -> Callable[[Request], Awaitable[Response]]:
    async def handler(request: Request) -> Response:
        state: WorkerState = request.app.state.worker
        try:
            return await fn(request, state)
        except _HTTPError as e:
            state.metrics.count(route, "rejected_busy" if e.status == 503 else "invalid")
            return error_response(e.err, e.status, e.headers)

    return handler


def _params(req: ExecuteRequest | CompletionRequest | ChatCompletionRequest, max_tokens: int,
            stop: list[str]) -> GenParams:
    return GenParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                     top_k=req.top_k, seed=req.seed, stop=tuple(stop))


# The job runner shared by every generating route.

Item = tuple[str, Any]


def start_job(state: WorkerState, route: str, tokens: list[int], params: GenParams,
              job_id: str) -> tuple[Job, asyncio.Queue[Item]]:
    """Take the slot (or 503) and run the job in a thread that feeds the returned queue.

    Callers have tokenized the prompt, so the model is loaded by now (`_engine`)."""
    if not state.slot.acquire(blocking=False):
        raise _HTTPError(503, AllSlotsBusy(f"worker {state.settings.worker_id} is running a job"),
                         {"Retry-After": "1"})
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Item] = asyncio.Queue()
    job = Job(job_id)
    state.job = job
    state.status = HealthStatus.busy

    def on_text(text: str, index: int) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, ("token", (text, index)))

    def run() -> None:
        item: Item
        try:
            result = state.engine.generate(tokens, params, job.cancel, on_text)
            state.metrics.record(result)
            outcome = "cancelled" if result.stop_reason is StopReason.CANCELLED else "completed"
            state.metrics.count(route, outcome)
            item = ("end", result)
        except RbeeError as e:
            state.metrics.count(route, "error")
            item = ("error", e)
        except Exception as e:  # llama.cpp failed mid-job: report it on the stream
            log.exception("generation failed")
            state.metrics.count(route, "error")
            item = ("error", RbeeError(f"generation failed: {e}"))
        finally:
            state.job = None
            if state.status is HealthStatus.busy:
                state.status = HealthStatus.ready
            state.slot.release()
        loop.call_soon_threadsafe(queue.put_nowait, item)

    job.thread = threading.Thread(target=run, name=f"job-{job_id}", daemon=True)
    job.thread.start()
    return job, queue


def _sse(event: str | None, data: Any) -> dict[str, str]:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return {"event": event, "data": payload} if event else {"data": payload}


def _stream(items: AsyncIterator[dict[str, str]]) -> Response:
    from sse_starlette import EventSourceResponse

    return EventSourceResponse(items, ping=15, headers={"Cache-Control": "no-store"})


async def drain(job: Job, queue: asyncio.Queue[Item]) -> AsyncIterator[Item]:
    """Yield the job's items to its end; a consumer that stops early cancels the job."""
    try:
        while True:
            item = await queue.get()
            yield item
            if item[0] != "token":
                return
    finally:
        job.cancel.set()


# Routes.

async def health(request: Request) -> Response:
    state: WorkerState = request.app.state.worker
    s = state.settings
    doc: dict[str, Any] = {
        "schema": HEALTH_SCHEMA,
        "status": state.status.value,
        "worker_id": s.worker_id,
        "model": s.model_id,
        "backend": s.backend,
        "device": s.device,
        "ctx": s.ctx,
        "vram_bytes": state.vram_bytes(),
        "uptime_s": round(time.monotonic() - state.started, 3),
    }
    if state.job is not None:
        doc["job_id"] = state.job.id
    if state.error is not None:
        doc["error"] = state.error.to_dict()
    return JSONResponse(doc)


async def execute(request: Request, state: WorkerState) -> Response:
    req: ExecuteRequest = await read_model(request, ExecuteRequest, state.settings.max_body_bytes)
    tokens = await _tokenize(state, req.prompt)
    job_id = req.job_id or f"job-{secrets.token_hex(6)}"
    job, queue = start_job(state, "execute", tokens, _params(req, req.max_tokens, req.stop),
                           job_id)

    async def events() -> AsyncIterator[dict[str, str]]:
        yield _sse("started", {"job_id": job_id, "model": state.settings.model_id})
        async for kind, value in drain(job, queue):
            if kind == "token":
                yield _sse("token", {"t": value[0], "i": value[1]})
            elif kind == "end":
                yield _sse("end", value.end_event())
            else:
                yield _sse("error", {"code": value.code, "message": value.message})

    return _stream(events())


def _engine(state: WorkerState) -> Engine:
    """The loaded engine; 503 while the model loads, or with the reason its load failed."""
    if state.engine.llama is None:
        if state.error is not None:
            raise _HTTPError(503, state.error)
        raise _HTTPError(503, WorkerLoading("the model is still loading"), {"Retry-After": "1"})
    return state.engine


async def _tokenize(state: WorkerState, prompt: str, add_bos: bool = True) -> list[int]:
    engine = _engine(state)
    tokens = engine.tokenize(prompt, add_bos=add_bos)
    n_ctx = engine.n_ctx
    if len(tokens) >= n_ctx:
        raise _HTTPError(400, InvalidRequest(
            f"the prompt is {len(tokens)} tokens; the context holds {n_ctx}", field="prompt",
            hint="Shorten the prompt or spawn the worker with a larger --ctx."))
    return tokens


async def cancel(request: Request, state: WorkerState) -> Response:
    req: CancelRequest = await read_model(request, CancelRequest, state.settings.max_body_bytes)
    job = state.job
    cancelled = job is not None and job.id == req.job_id
    if cancelled and job is not None:
        job.cancel.set()
    return JSONResponse({"job_id": req.job_id, "cancelling": cancelled}, status_code=202)


async def metrics(request: Request, state: WorkerState) -> Response:
    m = state.metrics
    wid = state.settings.worker_id
    lines = [
        "# HELP rbee_worker_requests_total Requests by route and outcome.",
        "# TYPE rbee_worker_requests_total counter",
    ]
    for (route, outcome), n in sorted(m.requests.items()):
        lines.append(f'rbee_worker_requests_total{{worker="{wid}",route="{route}",'
                     f'outcome="{outcome}"}} {n}')
    lines += [
        "# HELP rbee_worker_tokens_generated_total Tokens generated.",
        "# TYPE rbee_worker_tokens_generated_total counter",
        f'rbee_worker_tokens_generated_total{{worker="{wid}"}} {m.tokens_generated}',
        "# HELP rbee_worker_time_to_first_token_seconds Time to first token.",
        "# TYPE rbee_worker_time_to_first_token_seconds summary",
        f'rbee_worker_time_to_first_token_seconds_sum{{worker="{wid}"}} {m.ttft_sum_s:.6f}',
        f'rbee_worker_time_to_first_token_seconds_count{{worker="{wid}"}} {m.ttft_count}',
        "# HELP rbee_worker_decode_tokens_per_second Decode rate of the last job.",
        "# TYPE rbee_worker_decode_tokens_per_second gauge",
        f'rbee_worker_decode_tokens_per_second{{worker="{wid}"}} {m.last_tokens_per_sec:.3f}',
        "# HELP rbee_worker_busy 1 while a job runs.",
        "# TYPE rbee_worker_busy gauge",
        f'rbee_worker_busy{{worker="{wid}"}} {1 if state.job is not None else 0}',
        "# HELP rbee_worker_uptime_seconds Seconds since the worker started.",
        "# TYPE rbee_worker_uptime_seconds gauge",
        f'rbee_worker_uptime_seconds{{worker="{wid}"}} {time.monotonic() - state.started:.3f}',
    ]
    return PlainTextResponse("\n".join(lines) + "\n",
                             media_type="text/plain; version=0.0.4; charset=utf-8")


async def shutdown(request: Request, state: WorkerState) -> Response:
    def stop() -> None:
        state.cancel_current()
        state.request_exit()

    return JSONResponse({"status": "shutting_down"}, status_code=202,
                        background=BackgroundTask(stop))


# OpenAI-compatible routes.

_FINISH = {StopReason.EOS: "stop", StopReason.STOP_SEQUENCE: "stop",
           StopReason.MAX_TOKENS: "length", StopReason.CANCELLED: "stop"}


async def v1_models(request: Request, state: WorkerState) -> Response:
    return JSONResponse({"object": "list", "data": [{
        "id": state.settings.model_id, "object": "model", "created": int(time.time()),
        "owned_by": "rbee"}]})


async def v1_completions(request: Request, state: WorkerState) -> Response:
    req: CompletionRequest = await read_model(request, CompletionRequest,
                                              state.settings.max_body_bytes)
    prompt = req.prompt if isinstance(req.prompt, str) else "".join(req.prompt[:1])
    tokens = await _tokenize(state, prompt)
    params = _params(req, req.max_tokens or 16, stop_list(req.stop))
    return await _openai(state, "v1_completions", tokens, params, "text_completion", req.stream)


async def v1_chat(request: Request, state: WorkerState) -> Response:
    req: ChatCompletionRequest = await read_model(request, ChatCompletionRequest,
                                                  state.settings.max_body_bytes)
    prompt, stops, has_bos = _engine(state).format_chat([(m.role, m.text()) for m in req.messages])
    tokens = await _tokenize(state, prompt, add_bos=not has_bos)
    limit = req.max_completion_tokens or req.max_tokens or state.engine.n_ctx
    params = _params(req, limit, [*stop_list(req.stop), *stops])
    return await _openai(state, "v1_chat", tokens, params, "chat.completion", req.stream)


async def _openai(state: WorkerState, route: str, tokens: list[int], params: GenParams,
                  kind: str, stream: bool) -> Response:
    prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
    cid = f"{prefix}-{secrets.token_hex(12)}"
    job, queue = start_job(state, route, tokens, params, cid)
    created = int(time.time())
    model = state.settings.model_id
    chat = kind == "chat.completion"

    def choice(text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

    def chunk(text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        return {"id": cid, "object": obj, "created": created, "model": model,
                "choices": [choice(text, finish, first)]}

    def usage(result: GenResult) -> dict[str, int]:
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.tokens_out,
                "total_tokens": result.prompt_tokens + result.tokens_out}

    if stream:
        async def events() -> AsyncIterator[dict[str, str]]:
            if chat:
                yield _sse(None, chunk(None, None, first=True))
            async for kind_, value in drain(job, queue):
                if kind_ == "token":
                    yield _sse(None, chunk(value[0], None))
                elif kind_ == "end":
                    last = chunk(None if chat else "", _FINISH[value.stop_reason])
                    last["usage"] = usage(value)
                    yield _sse(None, last)
                else:
                    yield _sse(None, value.envelope())
            yield _sse(None, "[DONE]")

        return _stream(events())

    result: GenResult | None = None
    async for kind_, value in drain(job, queue):
        if kind_ == "end":
            result = value
        elif kind_ == "error":
            return error_response(value, 500)
    assert result is not None
    text = "".join(result.text)
    finish = _FINISH[result.stop_reason]
    if chat:
        body_choice = {"index": 0, "message": {"role": "assistant", "content": text},
                       "finish_reason": finish, "logprobs": None}
    else:
        body_choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return JSONResponse({"id": cid, "object": kind, "created": created, "model": model,
                         "choices": [body_choice], "usage": usage(result)})


def create_app(settings: WorkerSettings, engine: Engine) -> ASGIApp:
    """Build the worker's ASGI app; its state lives on `app.state.worker`."""
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/execute", _endpoint("execute", execute), methods=["POST"]),
        Route("/cancel", _endpoint("cancel", cancel), methods=["POST"]),
        Route("/metrics", _endpoint("metrics", metrics), methods=["GET"]),
        Route("/shutdown", _endpoint("shutdown", shutdown), methods=["POST"]),
        Route("/v1/models", _endpoint("v1_models", v1_models), methods=["GET"]),
        Route("/v1/completions", _endpoint("v1_completions", v1_completions), methods=["POST"]),
        Route("/v1/chat/completions", _endpoint("v1_chat", v1_chat), methods=["POST"]),
    ]
    app = Starlette(routes=routes)
    app.state.worker = WorkerState(settings=settings, engine=engine)

    def rejected(path: str) -> None:
        app.state.worker.metrics.count(path.strip("/").replace("/", "_") or "root",
                                       "unauthorized")

    wrapped = BearerAuth(app, settings.token, rejected)
    wrapped.state = app.state  # type: ignore[attr-defined]
    return wrapped
