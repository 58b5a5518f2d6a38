"""What a running worker knows: its settings, its status, the job in its one slot and who
waits for it."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from rbee_common.errors import ConfigInvalid, RbeeError
from rbee_common.names import Backend, HealthStatus
from worker.engine import Engine
from worker.metrics import Metrics
from worker.protocol import MAX_BODY_BYTES

QUEUE_WAIT_ENV = "RBEE_WORKER_QUEUE_WAIT"
QUEUE_WAIT_S = 30.0  # how long an OpenAI request waits for the slot, as llama.cpp's server
# and Ollama queue (OpenAI clients retry a 503 only twice)
QUEUE_MAX = 64  # requests waiting at once; more get 503 at once (each holds a connection)


def queue_wait_from_env() -> float:
    """Seconds an OpenAI request waits for the slot: $RBEE_WORKER_QUEUE_WAIT, read at start."""
    from rbee_common.config import env_number

    value = env_number(QUEUE_WAIT_ENV, QUEUE_WAIT_S, minimum=0, integer=False)
    if not math.isfinite(value) or value > 3600:
        raise ConfigInvalid(f"{QUEUE_WAIT_ENV}={value:g}: expected at most 3600 seconds",
                            hint=f"Fix or unset {QUEUE_WAIT_ENV}.", variable=QUEUE_WAIT_ENV)
    return value


@dataclass(frozen=True)
class WorkerSettings:
    worker_id: str
    model_id: str
    backend: str
    devices: tuple[int, ...]  # as rbee-hive numbers them (NVML order), not as CUDA sees them
    ctx: int
    token: str = field(repr=False)
    rpc: tuple[str, ...] = ()  # RPC lenders holding part of the model (HOST:PORT)
    max_body_bytes: int = MAX_BODY_BYTES
    queue_wait_s: float = field(default_factory=queue_wait_from_env)
    queue_max: int = QUEUE_MAX

    @property
    def device(self) -> int:
        """The first (or only) device."""
        return self.devices[0]


@dataclass
class Job:
    id: str
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class Slot:
    """The worker's one slot: taken at once or not at all (/execute), or waited for in
    arrival order for a bounded time (the /v1 routes).

    Used only on the event loop's thread, so it needs no lock: a job's thread gives it back
    through `loop.call_soon_threadsafe`. A freed slot goes straight to the first waiter, so a
    newcomer never overtakes the queue.
    """

    def __init__(self, max_waiters: int = QUEUE_MAX) -> None:
        self.busy = False
        self.closed = False  # the worker is stopping: nobody gets the slot any more
        self.max_waiters = max_waiters
        self.waiters: deque[asyncio.Future[bool]] = deque()
        self.loop: asyncio.AbstractEventLoop | None = None

    def try_take(self) -> bool:
        """Take the slot if it is free now."""
        self.loop = asyncio.get_running_loop()
        if self.busy or self.closed:
            return False
        self.busy = True
        return True

    async def take(self, timeout: float) -> bool:
        """Take the slot, waiting behind earlier callers up to `timeout` seconds; False when
        the wait ran out, the queue is full or the worker is stopping."""
        if self.try_take():
            return True
        if self.closed or timeout <= 0 or len(self.waiters) >= self.max_waiters:
            return False
        assert self.loop is not None
        turn: asyncio.Future[bool] = self.loop.create_future()
        self.waiters.append(turn)
        try:
            return await asyncio.wait_for(turn, timeout)
        except TimeoutError:
            return False
        except asyncio.CancelledError:
            # handed the slot in the same moment the caller gave up: pass it on
            if turn.done() and not turn.cancelled() and turn.result():
                self.release()
            raise
        finally:
            with contextlib.suppress(ValueError):
                self.waiters.remove(turn)

    def release(self) -> None:
        """Hand the slot to the first waiter still waiting, or free it."""
        while self.waiters:
            turn = self.waiters.popleft()
            if not turn.done():
                turn.set_result(True)
                return
        self.busy = False

    def close(self) -> None:
        """Turn every waiter away and let nobody take the slot again (the worker stops)."""
        self.closed = True
        while self.waiters:
            turn = self.waiters.popleft()
            if not turn.done():
                turn.set_result(False)


@dataclass
class WorkerState:
    settings: WorkerSettings
    engine: Engine
    status: HealthStatus = HealthStatus.loading
    error: RbeeError | None = None
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    slot: Slot = field(default_factory=Slot)
    job: Job | None = None
    metrics: Metrics = field(default_factory=Metrics)
    request_exit: Callable[[], None] = lambda: None
    _vram: tuple[float, int] = (0.0, 0)

    def __post_init__(self) -> None:
        self.slot.max_waiters = self.settings.queue_max

    def vram_bytes(self) -> int:
        """GPU memory this worker holds on all its devices (CUDA, via NVML; re-read at most
        once a second)."""
        if self.settings.backend != Backend.cuda or self.engine.llama is None:
            return 0
        at, value = self._vram
        if time.monotonic() - at > 1.0:
            from worker.engine import cuda_memory_of

            value = cuda_memory_of(os.getpid(), self.settings.devices)
            self._vram = (time.monotonic(), value)
        return value

    def job_started(self, job: Job) -> None:
        """The slot's holder starts its job (on the event loop)."""
        self.job = job
        self.status = HealthStatus.busy

    def job_done(self) -> None:
        """The job's thread has finished: pass the slot on (on the event loop)."""
        self.job = None
        self.slot.release()
        if self.status is HealthStatus.busy and not self.slot.busy:
            self.status = HealthStatus.ready

    def cancel_current(self) -> None:
        """Stop the running job and turn away whoever waits for the slot: the worker is
        stopping. Safe from any thread (a signal handler, a background task)."""
        job = self.job
        if job is not None:
            job.cancel.set()
        loop = self.slot.loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop has just stopped
                loop.call_soon_threadsafe(self.slot.close)
