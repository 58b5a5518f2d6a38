"""The queen's OpenAI gateway: `/v1/models`, `/v1/completions`, `/v1/chat/completions`, routed
by `model` through the same queue and placement as every other job.

A request becomes a job; its events become OpenAI chunks (stream) or one response. A client
that goes away cancels its job. Errors have OpenAI's shape (`message`, `type`, `param`,
`code`) with rbee's own code and hint beside them.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from rbee_common.asgi import HTTPError, event_stream, read_model, sse
from rbee_common.errors import InvalidRequest, ModelNotFound, RbeeError, RemoteError
from rbee_common.openai_errors import openai_body
from rbee_keeper.jobs import JobEventName, JobRequest
from rbee_keeper.queen.app import job_events, queen_of
from rbee_keeper.queen.live import LiveJob
from rbee_keeper.queen.runtime import QueueFull
from worker.schemas import ChatCompletionRequest, CompletionRequest, stop_list

E = JobEventName
FINISH = {"EOS": "stop", "STOP_SEQUENCE": "stop", "MAX_TOKENS": "length", "CANCELLED": "stop"}
UNTIL_CONTEXT_ENDS = 1_000_000  # a chat without max_tokens runs to EOS or the context's end
STREAM_DECIDE_S = 2.0  # how long a stream's headers wait for its first token or its error
STATUS = {"INVALID_REQUEST": 400, "INVALID_MODEL_REF": 404, "MODEL_NOT_FOUND": 404,
          "QUEUE_FULL": 429, "UNAUTHORIZED": 401, "CANCELLED": 499, "WORKER_CRASHED": 502,
          "INSUFFICIENT_VRAM": 503, "INSUFFICIENT_RAM": 503, "NO_PLACEMENT": 503,
          "ALL_SLOTS_BUSY": 503}


def openai_error(err: RbeeError, status: int | None = None,
                 headers: dict[str, str] | None = None) -> JSONResponse:
    status = status or STATUS.get(err.code, 500)
    return JSONResponse(openai_body(err, status), status_code=status, headers=headers)


def job_error(data: dict[str, Any]) -> RbeeError:
    """A job's `error` event as the error it reports (its details kept: the OpenAI code of a
    context overflow rides in them)."""
    return RemoteError(str(data.get("code") or "INTERNAL"), str(data.get("message")),
                       hint=str(data.get("hint") or ""), **(data.get("details") or {}))


def guard(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    async def handler(request: Request) -> Response:
        try:
            return await fn(request)
        except HTTPError as e:
            return openai_error(e.err, e.status, e.headers)
        except QueueFull as e:
            return openai_error(e, 429, {"Retry-After": str(e.details.get("retry_after", 2))})
        except RbeeError as e:
            return openai_error(e)

    return handler


def _model_entry(m: dict[str, Any], now: int) -> dict[str, Any]:
    return {"id": m["id"], "object": "model", "created": now, "owned_by": "rbee",
            "loaded": m["loaded"], "hosts": m["hosts"]}


async def models(request: Request) -> Response:
    doc = await asyncio.to_thread(queen_of(request).models_doc)
    now = int(time.time())
    return JSONResponse({"object": "list", "data": [_model_entry(m, now)
                                                    for m in doc["models"]]})


async def model(request: Request) -> Response:
    """One model, as `client.models.retrieve(id)` asks for it."""
    name = request.path_params["model"]
    doc = await asyncio.to_thread(queen_of(request).models_doc)
    for m in doc["models"]:
        if m["id"] == name:
            return JSONResponse(_model_entry(m, int(time.time())))
    raise ModelNotFound(f"no model {name!r} in the catalog or on any host",
                        hint="List the models with `GET /v1/models` (or `rbee-hive models "
                             "catalog`).")


def _params(req: CompletionRequest | ChatCompletionRequest) -> dict[str, Any]:
    """The sampling the job carries to the worker's /execute; what the queen's job events
    cannot carry back (log-probabilities, the echoed prompt) is refused naming the field."""
    for name in ("logprobs", "top_logprobs", "echo"):
        if getattr(req, name, None):
            raise HTTPError(400, InvalidRequest(
                f"{name}: not available through the queen (ask the worker directly)",
                field=name, openai_code="unsupported_parameter"))
    extra: dict[str, Any] = {}
    for name, off in (("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                      ("repeat_penalty", 1.0)):
        if getattr(req, name) != off:
            extra[name] = getattr(req, name)
    if req.logit_bias:
        extra["logit_bias"] = req.logit_bias
    if req.response_format is not None:
        extra["response_format"] = req.response_format.model_dump(by_alias=True,
                                                                   exclude_none=True)
    return {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
            "seed": req.seed, "stop": tuple(stop_list(req.stop)), "extra": extra}


async def completions(request: Request) -> Response:
    req: CompletionRequest = await read_model(request, CompletionRequest)
    if not req.model:
        raise HTTPError(400, InvalidRequest("model: the queen routes by model; name one",
                                            field="model"))
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if len(prompts) != 1:
        raise HTTPError(400, InvalidRequest("prompt: send one prompt per request",
                                            field="prompt"))
    job = JobRequest(model=req.model, prompt=prompts[0], max_tokens=req.max_tokens or 16,
                     **_params(req))
    return await _run(request, job, chat=False, stream=req.stream, model=req.model)


async def chat(request: Request) -> Response:
    req: ChatCompletionRequest = await read_model(request, ChatCompletionRequest)
    if not req.model:
        raise HTTPError(400, InvalidRequest("model: the queen routes by model; name one",
                                            field="model"))
    limit = req.max_completion_tokens or req.max_tokens or UNTIL_CONTEXT_ENDS
    job = JobRequest(model=req.model, messages=tuple((m.role, m.text()) for m in req.messages),
                     max_tokens=limit, **_params(req))
    return await _run(request, job, chat=True, stream=req.stream, model=req.model)


async def _run(request: Request, req: JobRequest, *, chat: bool, stream: bool,
               model: str) -> Response:
    q = queen_of(request)
    job = await asyncio.to_thread(q.submit, req, "openai")
    cid = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
    created = int(time.time())
    kind = "chat.completion" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish,
                                      "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish,
                      "logprobs": None}
        return {"id": cid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": model, "choices": [choice]}

    def usage(end: dict[str, Any], tokens: int) -> dict[str, int]:
        prompt = int(end.get("prompt_tokens") or 0)
        out = int(end.get("tokens_out", tokens))
        return {"prompt_tokens": prompt, "completion_tokens": out,
                "total_tokens": prompt + out}

    if stream:
        error = await _early_error(request, q, job)
        if error is not None:
            return openai_error(job_error(error))

        async def items() -> AsyncIterator[dict[str, Any]]:
            try:
                if chat:
                    yield sse(None, chunk(None, None, first=True))
                async for _, name, data in job_events(q, job.id, -1):
                    if name == E.token:
                        yield sse(None, chunk(data["t"], None))
                    elif name == E.end:
                        last = chunk(None if chat else "",
                                     FINISH.get(str(data.get("stop_reason")), "stop"))
                        last["usage"] = usage(data, job.tokens)
                        yield sse(None, last)
                    elif name == E.error:
                        err = job_error(data)
                        yield sse(None, openai_body(err, STATUS.get(err.code, 500)))
                yield sse(None, "[DONE]")
            finally:
                _cancel_if_running(q, job)

        return event_stream(items())

    end, error = await _wait(request, q, job)
    if error is not None:
        return openai_error(job_error(error))
    text = "".join(job.text)
    finish = FINISH.get(str(end.get("stop_reason")), "stop")
    if chat:
        body_choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None,
                                       "message": {"role": "assistant", "content": text}}
    else:
        body_choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return JSONResponse({"id": cid, "object": kind, "created": created, "model": model,
                         "choices": [body_choice], "usage": usage(end, job.tokens)})


async def _early_error(request: Request, q: Any, job: LiveJob) -> dict[str, Any] | None:
    """The error of a job that fails before its first token (an unknown model, nowhere it
    fits, a prompt longer than the context), so that a stream that cannot start is an HTTP
    error, as OpenAI answers it. A job with no token yet after STREAM_DECIDE_S (queued, or a
    model still loading) streams from there: its client hears of an error then as a chunk."""
    async def first() -> dict[str, Any] | None:
        async for _, name, data in job_events(q, job.id, -1):
            if name == E.error:
                return data
            if name in (E.token, E.end):
                return None
        return None

    watcher = asyncio.create_task(_watch(request, q, job))
    try:
        return await asyncio.wait_for(first(), STREAM_DECIDE_S)
    except TimeoutError:
        return None
    finally:
        watcher.cancel()


async def _watch(request: Request, q: Any, job: LiveJob) -> None:
    """Cancel the job if its client goes away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            _cancel_if_running(q, job)
            return


async def _wait(request: Request, q: Any, job: LiveJob
                ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The job's end (or error); the job is cancelled if the client goes away first."""
    watcher = asyncio.create_task(_watch(request, q, job))
    try:
        async for _, name, data in job_events(q, job.id, -1):
            if name == E.end:
                return data, None
            if name == E.error:
                return {}, data
    finally:
        watcher.cancel()
    return {}, {"code": "INTERNAL", "message": "the job ended without an end event"}


def _cancel_if_running(q: Any, job: LiveJob) -> None:
    if not job.final:
        q.cancel_job(job.id)
