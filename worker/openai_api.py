"""OpenAI-compatible routes (/v1/models, /v1/models/{id}, /v1/completions,
/v1/chat/completions) and the mapping of a job's events onto OpenAI's response and chunk
shapes.

Unlike /execute, these routes wait for the busy slot (bounded, in arrival order) before
answering 503, as OpenAI clients expect of a server; a client that leaves, streaming or not,
cancels its job.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from rbee_common.asgi import HTTPError, event_stream, openai_error, read_model, sse
from rbee_common.errors import ModelNotFound
from rbee_common.names import JobEvent, StopReason
from rbee_common.openai_errors import openai_body
from worker.engine import GenParams, GenResult, TokenLogprob
from worker.jobs import (
    drain,
    format_chat,
    gen_params,
    start_job,
    tokenize,
    wait_for_slot,
    watch_disconnect,
)
from worker.routes import API_HINT
from worker.schemas import ChatCompletionRequest, CompletionRequest, stop_list
from worker.state import WorkerState

_FINISH = {StopReason.EOS: "stop", StopReason.STOP_SEQUENCE: "stop",
           StopReason.MAX_TOKENS: "length", StopReason.CANCELLED: "stop"}


def _model_doc(state: WorkerState) -> dict[str, Any]:
    return {"id": state.settings.model_id, "object": "model",
            "created": int(state.started_wall), "owned_by": "rbee"}


async def v1_models(request: Request, state: WorkerState) -> Response:
    """GET /v1/models: the one model this worker serves."""
    return JSONResponse({"object": "list", "data": [_model_doc(state)]})


async def v1_model(request: Request, state: WorkerState) -> Response:
    """GET /v1/models/{id}: the model, or OpenAI's 404 model_not_found."""
    wanted = request.path_params["model_id"]
    if wanted != state.settings.model_id:
        raise HTTPError(404, ModelNotFound(
            f"The model {wanted!r} does not exist: this worker serves "
            f"{state.settings.model_id!r}", field="model",
            hint="List the model with GET /v1/models."))
    return JSONResponse(_model_doc(state))


@dataclass(frozen=True)
class _Answer:
    """How a job's output becomes OpenAI's shapes for one request."""

    chat: bool
    logprobs: bool
    echo: str = ""  # completions: the prompt, given back before the output


async def v1_completions(request: Request, state: WorkerState) -> Response:
    """POST /v1/completions."""
    req: CompletionRequest = await read_model(request, CompletionRequest,
                                              state.settings.max_body_bytes, hint=API_HINT)
    tokens = await tokenize(state, req.prompt)
    params = gen_params(req, state.engine, req.max_tokens or 16, stop_list(req.stop),
                        logprobs=req.logprobs)
    answer = _Answer(chat=False, logprobs=req.logprobs is not None,
                     echo=req.prompt if req.echo else "")
    return await _openai(request, state, "v1_completions", tokens, params, answer, req.stream)


async def v1_chat(request: Request, state: WorkerState) -> Response:
    """POST /v1/chat/completions, formatted with the model's own chat template."""
    req: ChatCompletionRequest = await read_model(request, ChatCompletionRequest,
                                                  state.settings.max_body_bytes, hint=API_HINT)
    prompt, stops, has_bos = format_chat(state, req.messages)
    tokens = await tokenize(state, prompt, add_bos=not has_bos, field="messages")
    limit = req.max_completion_tokens or req.max_tokens or state.engine.n_ctx
    params = gen_params(req, state.engine, limit, [*stop_list(req.stop), *stops],
                        logprobs=(req.top_logprobs or 0) if req.logprobs else None)
    answer = _Answer(chat=True, logprobs=bool(req.logprobs))
    return await _openai(request, state, "v1_chat", tokens, params, answer, req.stream)


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def _chat_logprobs(lps: list[TokenLogprob]) -> dict[str, Any]:
    def entry(piece: bytes, logprob: float) -> dict[str, Any]:
        return {"token": _text(piece), "logprob": logprob, "bytes": list(piece)}

    return {"content": [{**entry(lp.token, lp.logprob),
                         "top_logprobs": [entry(t, p) for t, p in lp.top]} for lp in lps],
            "refusal": None}


def _completion_logprobs(lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
    tokens = [_text(lp.token) for lp in lps]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{_text(t): p for t, p in lp.top} for lp in lps],
            "text_offset": offsets}


async def _openai(request: Request, state: WorkerState, route: str, tokens: list[int],
                  params: GenParams, answer: _Answer, stream: bool) -> Response:
    chat = answer.chat
    cid = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
    await wait_for_slot(request, state)
    job, queue = start_job(state, route, tokens, params, cid)
    created = int(time.time())
    model = state.settings.model_id
    offset = len(answer.echo)  # completions: where the next token's text starts

    def logprobs_of(lps: list[TokenLogprob] | None) -> dict[str, Any] | None:
        nonlocal offset
        if not answer.logprobs or lps is None:
            return None
        if chat:
            return _chat_logprobs(lps)
        doc = _completion_logprobs(lps, offset)
        offset += sum(len(t) for t in doc["tokens"])
        return doc

    def choice(text: str | None, finish: str | None, first: bool = False,
               lps: list[TokenLogprob] | None = None) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "finish_reason": finish,
                    "logprobs": logprobs_of(lps)}
        return {"index": 0, "text": text or "", "finish_reason": finish,
                "logprobs": logprobs_of(lps)}

    def chunk(text: str | None, finish: str | None, first: bool = False,
              lps: list[TokenLogprob] | None = None) -> dict[str, Any]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        return {"id": cid, "object": obj, "created": created, "model": model,
                "choices": [choice(text, finish, first, lps)]}

    def usage(result: GenResult) -> dict[str, int]:
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.tokens_out,
                "total_tokens": result.prompt_tokens + result.tokens_out}

    if stream:
        async def events() -> AsyncIterator[dict[str, str]]:
            if chat:
                yield sse(None, chunk(None, None, first=True))
            elif answer.echo:
                yield sse(None, chunk(answer.echo, None))
            async for kind_, value in drain(job, queue):
                if kind_ is JobEvent.token:
                    yield sse(None, chunk(value[0], None, lps=value[2]))
                elif kind_ is JobEvent.end:
                    last = chunk(None if chat else "", _FINISH[value.stop_reason])
                    last["usage"] = usage(value)
                    yield sse(None, last)
                else:
                    yield sse(None, openai_body(value, 500))
            yield sse(None, "[DONE]")

        return event_stream(events())

    # nobody reads a stream here to notice a client that leaves: watch for it, so its job
    # stops instead of holding the slot to max_tokens
    gone = watch_disconnect(request, job.cancel.set)
    result: GenResult | None = None
    try:
        async for kind_, value in drain(job, queue):
            if kind_ is JobEvent.end:
                result = value
            elif kind_ is JobEvent.error:
                return openai_error(value, 500)
    finally:
        gone.cancel()
    assert result is not None
    text = answer.echo + "".join(result.text)
    finish = _FINISH[result.stop_reason]
    lps = logprobs_of(result.logprobs)
    if chat:
        body_choice = {"index": 0, "message": {"role": "assistant", "content": text},
                       "finish_reason": finish, "logprobs": lps}
    else:
        body_choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": lps}
    return JSONResponse({"id": cid, "object": "chat.completion" if chat else "text_completion",
                         "created": created, "model": model, "choices": [body_choice],
                         "usage": usage(result)})
