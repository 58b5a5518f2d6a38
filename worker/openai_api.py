"""OpenAI-compatible routes (/v1/models, /v1/completions, /v1/chat/completions) and the
mapping of a job's events onto OpenAI's response and chunk shapes."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from rbee_common.asgi import error_response, event_stream, read_model, sse
from rbee_common.names import JobEvent, StopReason
from worker.engine import GenParams, GenResult
from worker.jobs import drain, gen_params, loaded_engine, start_job, tokenize
from worker.routes import API_HINT
from worker.schemas import ChatCompletionRequest, CompletionRequest, stop_list
from worker.state import WorkerState

_FINISH = {StopReason.EOS: "stop", StopReason.STOP_SEQUENCE: "stop",
           StopReason.MAX_TOKENS: "length", StopReason.CANCELLED: "stop"}


async def v1_models(request: Request, state: WorkerState) -> Response:
    return JSONResponse({"object": "list", "data": [{
        "id": state.settings.model_id, "object": "model", "created": int(time.time()),
        "owned_by": "rbee"}]})


async def v1_completions(request: Request, state: WorkerState) -> Response:
    req: CompletionRequest = await read_model(request, CompletionRequest,
                                              state.settings.max_body_bytes, hint=API_HINT)
    prompt = req.prompt if isinstance(req.prompt, str) else "".join(req.prompt[:1])
    tokens = await tokenize(state, prompt)
    params = gen_params(req, req.max_tokens or 16, stop_list(req.stop))
    return await _openai(state, "v1_completions", tokens, params, "text_completion", req.stream)


async def v1_chat(request: Request, state: WorkerState) -> Response:
    req: ChatCompletionRequest = await read_model(request, ChatCompletionRequest,
                                                  state.settings.max_body_bytes, hint=API_HINT)
    prompt, stops, has_bos = loaded_engine(state).format_chat(
        [(m.role, m.text()) for m in req.messages])
    tokens = await tokenize(state, prompt, add_bos=not has_bos)
    limit = req.max_completion_tokens or req.max_tokens or state.engine.n_ctx
    params = gen_params(req, limit, [*stop_list(req.stop), *stops])
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
                yield sse(None, chunk(None, None, first=True))
            async for kind_, value in drain(job, queue):
                if kind_ is JobEvent.token:
                    yield sse(None, chunk(value[0], None))
                elif kind_ is JobEvent.end:
                    last = chunk(None if chat else "", _FINISH[value.stop_reason])
                    last["usage"] = usage(value)
                    yield sse(None, last)
                else:
                    yield sse(None, value.envelope())
            yield sse(None, "[DONE]")

        return event_stream(events())

    result: GenResult | None = None
    async for kind_, value in drain(job, queue):
        if kind_ is JobEvent.end:
            result = value
        elif kind_ is JobEvent.error:
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
