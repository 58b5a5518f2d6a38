"""What a running worker knows: its settings, its status, the job in its one slot."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rbee_common.errors import RbeeError
from rbee_common.names import Backend, HealthStatus
from worker.engine import Engine
from worker.metrics import Metrics
from worker.protocol import MAX_BODY_BYTES


@dataclass(frozen=True)
class WorkerSettings:
    worker_id: str
    model_id: str
    backend: str
    devices: tuple[int, ...]  # as rbee-hive numbers them (NVML order), not as CUDA sees them
    ctx: int
    token: str = field(repr=False)
    max_body_bytes: int = MAX_BODY_BYTES

    @property
    def device(self) -> int:
        """The first (or only) device."""
        return self.devices[0]


@dataclass
class Job:
    id: str
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


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

    def cancel_current(self) -> None:
        job = self.job
        if job is not None:
            job.cancel.set()
