"""Running one job: the prompt's tokens, the worker's one slot, and the thread→asyncio bridge.

The generation loop runs in a thread (llama.cpp blocks) and feeds an asyncio queue; the
route reads it with `drain`. A cancel flag stops the loop: POST /cancel sets it, and so does
a consumer that stops early or a client that goes away (`watch_disconnect`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request

from rbee_common.asgi import HTTPError
from rbee_common.errors import RbeeError
from rbee_common.names import JobEvent, StopReason
from worker.engine import Engine, GenParams, TokenLogprob
from worker.errors import AllSlotsBusy, InvalidRequest, WorkerLoading
from worker.schemas import ChatMessage, ResponseFormat, Sampling
from worker.state import Job, WorkerState

log = logging.getLogger("rbee.worker")

# (event, value): token (text, index, logprobs), then end (GenResult) or error (RbeeError)
Item = tuple[JobEvent, Any]
CONTEXT_HINT = "Shorten the prompt or spawn the worker with a larger --ctx."


class ClientGone(Exception):
    """The client went away before its job started: nobody is left to answer."""


def gen_params(req: Any, engine: Engine, max_tokens: int, stop: list[str],
               logprobs: int | None = None) -> GenParams:
    """The engine's parameters for a request: its sampling, token limit and stop strings;
    400 naming the field for a logit bias or response format the model cannot take."""
    sampling: Sampling = req
    bias = tuple((int(k), float(v)) for k, v in (sampling.logit_bias or {}).items())
    n_vocab = engine.n_vocab
    for token, _ in bias:
        if token >= n_vocab:
            raise HTTPError(400, InvalidRequest(
                f"logit_bias: token {token} is not in the model's vocabulary of {n_vocab}",
                field="logit_bias"))
    return GenParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                     top_k=req.top_k, seed=req.seed, stop=tuple(stop),
                     presence_penalty=sampling.presence_penalty,
                     frequency_penalty=sampling.frequency_penalty,
                     repeat_penalty=sampling.repeat_penalty, logit_bias=bias, logprobs=logprobs,
                     grammar=grammar_for(sampling.response_format, engine))


def grammar_for(fmt: ResponseFormat | None, engine: Engine) -> str | None:
    """The GBNF grammar that holds the output to a response format (None: plain text), as
    llama-cpp-python's server builds it; 400 naming response_format when it cannot."""
    if fmt is None or fmt.type == "text":
        return None
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    schema = fmt.json_schema_doc()
    if schema is None:
        gbnf = JSON_GBNF
    else:
        try:
            gbnf = json_schema_to_gbnf(json.dumps(schema))
        except Exception as e:  # the converter raises whatever its parser meets
            raise HTTPError(400, InvalidRequest(
                f"response_format: the JSON schema cannot become a grammar: {e}",
                field="response_format")) from e
    if not engine.grammar_compiles(gbnf):
        raise HTTPError(400, InvalidRequest(
            "response_format: llama.cpp refused the grammar made from this JSON schema",
            field="response_format"))
    return gbnf


def loaded_engine(state: WorkerState) -> Engine:
    """The loaded engine; 503 while the model loads, or with the reason its load failed."""
    if state.engine.llama is None:
        if state.error is not None:
            raise HTTPError(503, state.error)
        raise HTTPError(503, WorkerLoading("the model is still loading"), {"Retry-After": "1"})
    return state.engine


async def tokenize(state: WorkerState, prompt: str, add_bos: bool = True,
                   field: str = "prompt") -> list[int]:
    """The prompt's tokens; 400 when it does not leave room in the context (in OpenAI's words
    and code, which clients such as LiteLLM turn into their context-window error)."""
    engine = loaded_engine(state)
    tokens = engine.tokenize(prompt, add_bos=add_bos)
    n_ctx = engine.n_ctx
    if len(tokens) >= n_ctx:
        raise HTTPError(400, InvalidRequest(
            f"This model's maximum context length is {n_ctx} tokens; the {field} is "
            f"{len(tokens)} tokens.", field=field, hint=CONTEXT_HINT,
            openai_code="context_length_exceeded"))
    return tokens


def format_chat(state: WorkerState, messages: list[ChatMessage]) -> tuple[str, list[str], bool]:
    """The conversation rendered with the model's chat template: 400 when the template
    refuses these messages (its raise_exception, as for roles out of turn), a coded 500 when
    it breaks on them."""
    import jinja2

    engine = loaded_engine(state)
    try:
        return engine.format_chat([(m.role, m.text()) for m in messages])
    except (ValueError, jinja2.TemplateError) as e:
        raise HTTPError(400, InvalidRequest(
            f"messages: the model's chat template refused them: {e}", field="messages",
            hint="Reorder or merge the messages as the model's template expects.")) from e
    except Exception as e:
        log.exception("the chat template failed")
        raise HTTPError(500, RbeeError(
            f"the model's chat template failed on these messages: {type(e).__name__}: {e}",
            hint="Send a prompt of your own to /v1/completions instead.")) from e


def take_slot_now(state: WorkerState) -> None:
    """Take the slot or answer 503 at once: /execute's rule, the scheduler's signal to go
    elsewhere."""
    if not state.slot.try_take():
        raise HTTPError(503, AllSlotsBusy(f"worker {state.settings.worker_id} is running a job"),
                        {"Retry-After": "1"})


async def wait_for_slot(request: Request, state: WorkerState) -> None:
    """Take the slot, waiting behind earlier requests for up to the worker's queue wait (the
    /v1 routes' rule, as OpenAI clients expect); 503 when it runs out; ClientGone when the
    client leaves first."""
    slot, wid, wait = state.slot, state.settings.worker_id, state.settings.queue_wait_s
    queued = len(slot.waiters)
    take = asyncio.ensure_future(slot.take(wait))
    gone = watch_disconnect(request, take.cancel)
    try:
        taken = await take
    except asyncio.CancelledError:
        if gone.done():
            raise ClientGone from None
        raise
    finally:
        gone.cancel()
    if taken:
        return
    if slot.closed:
        why = f"worker {wid} is stopping"
    elif queued >= slot.max_waiters:
        why = f"worker {wid} is running a job and {queued} requests wait for it"
    else:
        why = f"worker {wid} stayed busy for the {wait:g} s a request waits"
    raise HTTPError(503, AllSlotsBusy(why), {"Retry-After": "1"})


def watch_disconnect(request: Request, on_gone: Callable[[], None]) -> asyncio.Task[None]:
    """Call `on_gone` if the client disconnects (its body is read by now, so the only message
    left is the disconnect); cancel the returned task when the answer is done."""
    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        on_gone()

    return asyncio.ensure_future(watch())


def start_job(state: WorkerState, route: str, tokens: list[int], params: GenParams,
              job_id: str) -> tuple[Job, asyncio.Queue[Item]]:
    """Run the job in a thread that feeds the returned queue. The caller holds the slot
    (take_slot_now or wait_for_slot); the job's end gives it back."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Item] = asyncio.Queue()
    job = Job(job_id)
    state.job_started(job)

    def on_text(text: str, index: int, logprobs: list[TokenLogprob]) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (JobEvent.token, (text, index, logprobs)))

    def run() -> None:
        item: Item
        try:
            result = state.engine.generate(tokens, params, job.cancel, on_text)
            state.metrics.record(result)
            outcome = "cancelled" if result.stop_reason is StopReason.CANCELLED else "completed"
            state.metrics.count(route, outcome)
            item = (JobEvent.end, result)
        except RbeeError as e:
            state.metrics.count(route, "error")
            item = (JobEvent.error, e)
        except Exception as e:  # llama.cpp failed mid-job: report it on the stream
            log.exception("generation failed")
            state.metrics.count(route, "error")
            item = (JobEvent.error, RbeeError(f"generation failed: {e}"))
        # the slot passes on (on the loop's thread) before the end reaches the client, so a
        # request sent the moment this answer ends finds it free or queued
        with_loop(loop, state.job_done)
        with_loop(loop, queue.put_nowait, item)

    job.thread = threading.Thread(target=run, name=f"job-{job_id}", daemon=True)
    try:
        job.thread.start()
    except BaseException:
        state.job_done()
        raise
    return job, queue


def with_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """Run `fn(*args)` on the loop's thread; nothing when the loop is gone (worker exit)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


async def drain(job: Job, queue: asyncio.Queue[Item]) -> AsyncIterator[Item]:
    """Yield the job's items to its end; a consumer that stops early cancels the job."""
    try:
        while True:
            item = await queue.get()
            yield item
            if item[0] is not JobEvent.token:
                return
    finally:
        job.cancel.set()
