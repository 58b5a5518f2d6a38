"""rbee's own worker routes (DESIGN.md §4): /health, /execute, /cancel, /metrics, /shutdown."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from rbee_common.asgi import event_stream, read_model, sse
from rbee_common.names import JobEvent
from worker.jobs import drain, format_chat, gen_params, start_job, take_slot_now, tokenize
from worker.metrics import prometheus_text
from worker.schemas import HEALTH_SCHEMA, CancelRequest, ExecuteRequest
from worker.state import WorkerState

API_HINT = "See the worker API in DESIGN.md §4."


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
        "devices": list(s.devices),
        "rpc": list(s.rpc),
        "split": state.engine.split or [  # still loading: the devices, shares unknown
            {"device": name, "share": None, "bytes": None}
            for name in [*(f"rpc:{e}" for e in s.rpc), *(f"{s.backend}:{d}" for d in s.devices)]],
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
    req: ExecuteRequest = await read_model(request, ExecuteRequest, state.settings.max_body_bytes,
                                            hint=API_HINT)
    stops = list(req.stop)
    if req.messages is not None:
        prompt, template_stops, has_bos = format_chat(state, req.messages)
        tokens = await tokenize(state, prompt, add_bos=not has_bos, field="messages")
        stops += template_stops
    else:
        assert req.prompt is not None
        tokens = await tokenize(state, req.prompt)
    params = gen_params(req, state.engine, req.max_tokens, stops)
    job_id = req.job_id or f"job-{secrets.token_hex(6)}"
    take_slot_now(state)
    job, queue = start_job(state, "execute", tokens, params, job_id)

    async def events() -> AsyncIterator[dict[str, str]]:
        yield sse(JobEvent.started, {"job_id": job_id, "model": state.settings.model_id})
        async for kind, value in drain(job, queue):
            if kind is JobEvent.token:
                yield sse(JobEvent.token, {"t": value[0], "i": value[1]})
            elif kind is JobEvent.end:
                yield sse(JobEvent.end, value.end_event())
            else:
                yield sse(JobEvent.error, {"code": value.code, "message": value.message,
                                           "hint": value.hint})

    return event_stream(events())


async def cancel(request: Request, state: WorkerState) -> Response:
    req: CancelRequest = await read_model(request, CancelRequest, state.settings.max_body_bytes,
                                           hint=API_HINT)
    job = state.job
    cancelled = job is not None and job.id == req.job_id
    if cancelled and job is not None:
        job.cancel.set()
    return JSONResponse({"job_id": req.job_id, "cancelling": cancelled}, status_code=202)


async def metrics(request: Request, state: WorkerState) -> Response:
    text = prometheus_text(state.metrics, state.settings.worker_id, state.job is not None,
                           time.monotonic() - state.started, len(state.slot.waiters))
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


async def shutdown(request: Request, state: WorkerState) -> Response:
    def stop() -> None:
        state.cancel_current()
        state.request_exit()

    return JSONResponse({"status": "shutting_down"}, status_code=202,
                        background=BackgroundTask(stop))
