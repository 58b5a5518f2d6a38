"""Running one job: the prompt's tokens, the worker's one slot, and the thread→asyncio bridge.

The generation loop runs in a thread (llama.cpp blocks) and feeds an asyncio queue; the
route reads it with `drain`. A cancel flag stops the loop: POST /cancel sets it, and so does
a consumer that stops early (a client that went away).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from rbee_common.asgi import HTTPError
from rbee_common.errors import RbeeError
from rbee_common.names import HealthStatus, JobEvent, StopReason
from worker.engine import Engine, GenParams
from worker.errors import AllSlotsBusy, InvalidRequest, WorkerLoading
from worker.schemas import ChatCompletionRequest, CompletionRequest, ExecuteRequest
from worker.state import Job, WorkerState

log = logging.getLogger("rbee.worker")

# (event, value): token (text, index), then end (GenResult) or error (RbeeError)
Item = tuple[JobEvent, Any]


def gen_params(req: ExecuteRequest | CompletionRequest | ChatCompletionRequest, max_tokens: int,
               stop: list[str]) -> GenParams:
    """The engine's parameters for a request, with its token limit and stop strings."""
    return GenParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                     top_k=req.top_k, seed=req.seed, stop=tuple(stop))


def loaded_engine(state: WorkerState) -> Engine:
    """The loaded engine; 503 while the model loads, or with the reason its load failed."""
    if state.engine.llama is None:
        if state.error is not None:
            raise HTTPError(503, state.error)
        raise HTTPError(503, WorkerLoading("the model is still loading"), {"Retry-After": "1"})
    return state.engine


async def tokenize(state: WorkerState, prompt: str, add_bos: bool = True) -> list[int]:
    """The prompt's tokens; 400 when it does not leave room in the context."""
    engine = loaded_engine(state)
    tokens = engine.tokenize(prompt, add_bos=add_bos)
    n_ctx = engine.n_ctx
    if len(tokens) >= n_ctx:
        raise HTTPError(400, InvalidRequest(
            f"the prompt is {len(tokens)} tokens; the context holds {n_ctx}", field="prompt",
            hint="Shorten the prompt or spawn the worker with a larger --ctx."))
    return tokens


def start_job(state: WorkerState, route: str, tokens: list[int], params: GenParams,
              job_id: str) -> tuple[Job, asyncio.Queue[Item]]:
    """Take the slot (or 503) and run the job in a thread that feeds the returned queue.

    Callers have tokenized the prompt, so the model is loaded by now (`loaded_engine`)."""
    if not state.slot.acquire(blocking=False):
        raise HTTPError(503, AllSlotsBusy(f"worker {state.settings.worker_id} is running a job"),
                        {"Retry-After": "1"})
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Item] = asyncio.Queue()
    job = Job(job_id)
    state.job = job
    state.status = HealthStatus.busy

    def on_text(text: str, index: int) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (JobEvent.token, (text, index)))

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
        finally:
            state.job = None
            if state.status is HealthStatus.busy:
                state.status = HealthStatus.ready
            state.slot.release()
        loop.call_soon_threadsafe(queue.put_nowait, item)

    job.thread = threading.Thread(target=run, name=f"job-{job_id}", daemon=True)
    job.thread.start()
    return job, queue


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
