"""Names every rbee package spells the same way: backends, worker states, event names.

One home for them, so a hive, the keeper, a worker and (later) the daemons never disagree
on a string. They are StrEnums: each member *is* its string, in JSON and in comparisons.
"""

from __future__ import annotations

from enum import StrEnum


class Backend(StrEnum):
    """Where a worker runs its model."""

    cpu = "cpu"
    cuda = "cuda"
    metal = "metal"


BACKENDS: tuple[str, ...] = tuple(b.value for b in Backend)
GPU_BACKENDS = frozenset({Backend.cuda.value, Backend.metal.value})


def is_gpu(backend: str) -> bool:
    return backend in GPU_BACKENDS


class WorkerState(StrEnum):
    """A worker's state in a hive's registry and in `worker list`."""

    loading = "loading"
    ready = "ready"
    busy = "busy"
    error = "error"  # running but failed (its load failed, or it stopped answering)
    dead = "dead"  # its process is gone


LIVE_STATES = frozenset({WorkerState.loading, WorkerState.ready, WorkerState.busy})


class HealthStatus(StrEnum):
    """`status` of a worker's GET /health."""

    loading = "loading"
    ready = "ready"
    busy = "busy"
    error = "error"


class StopReason(StrEnum):
    """Why a generation ended (the `end` event's stop_reason)."""

    MAX_TOKENS = "MAX_TOKENS"
    EOS = "EOS"
    STOP_SEQUENCE = "STOP_SEQUENCE"
    CANCELLED = "CANCELLED"


class JobEvent(StrEnum):
    """Server-sent events of a worker's POST /execute."""

    started = "started"
    token = "token"
    end = "end"
    error = "error"


class ProgressEvent(StrEnum):
    """Lines of `--format ndjson`: progress while a command works, then its result or error."""

    phase = "phase"
    progress = "progress"
    done = "done"
    log = "log"
    line = "line"  # one line of a followed log
    result = "result"
    error = "error"


PROGRESS_EVENTS = frozenset({ProgressEvent.phase, ProgressEvent.progress, ProgressEvent.done,
                             ProgressEvent.log})
