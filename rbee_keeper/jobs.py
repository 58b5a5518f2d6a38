"""A job and its state machine: what the queen persists before every side effect.

    queued ──▶ placed ──▶ running ──▶ done
       │          │           ├────▶ failed
       │          │           └────▶ cancelled
       └──────────┴──▶ failed | cancelled

A transition that is not in this table is a bug and raises: a restarted queen trusts the
states it reads back. Event names (the job's SSE stream) are defined here once.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from rbee_common.errors import RbeeError


class JobState(StrEnum):
    queued = "queued"
    placed = "placed"  # a worker is chosen (maybe still to download, spawn or evict for)
    running = "running"  # the worker streams its tokens
    done = "done"
    failed = "failed"
    cancelled = "cancelled"


FINAL_STATES = frozenset({JobState.done, JobState.failed, JobState.cancelled})
ACTIVE_STATES = frozenset({JobState.placed, JobState.running})

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.queued: frozenset({JobState.placed, JobState.failed, JobState.cancelled}),
    JobState.placed: frozenset({JobState.running, JobState.queued, JobState.failed,
                                JobState.cancelled}),
    JobState.running: frozenset({JobState.done, JobState.failed, JobState.cancelled}),
    JobState.done: frozenset(),
    JobState.failed: frozenset(),
    JobState.cancelled: frozenset(),
}


class JobEventName(StrEnum):
    """The events of `GET /v2/tasks/{id}/events`."""

    queued = "queued"  # {position}
    placed = "placed"  # {host, backend, device, devices, reason, rejected, worker}
    evicting = "evicting"  # {host, worker, model, reason}
    downloading = "downloading"  # {bytes, total}
    loading = "loading"  # {host, worker?}
    started = "started"  # {worker, host}
    token = "token"  # {t, i}
    end = "end"  # {tokens_out, stop_reason, ttft_ms, decode_ms, tokens_per_sec}
    error = "error"  # {code, message, hint}


FINAL_EVENTS = frozenset({JobEventName.end, JobEventName.error})


class InvalidTransition(RbeeError):
    """A job was asked to move to a state its current state cannot reach (a queen bug)."""

    code = "INTERNAL"


def check_transition(current: JobState, new: JobState) -> None:
    if new not in TRANSITIONS[current]:
        raise InvalidTransition(f"a job cannot go from {current} to {new}")


def new_job_id() -> str:
    return f"job-{secrets.token_hex(6)}"


@dataclass(frozen=True)
class JobRequest:
    """What a client asked for: a model and either a prompt or chat messages, and sampling."""

    model: str
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content)
    max_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    seed: int | None = None
    stop: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)  # penalties, logit_bias, … as given

    def body(self, job_id: str) -> dict[str, Any]:
        """The worker's /execute body for this job."""
        body: dict[str, Any] = {"job_id": job_id, "max_tokens": self.max_tokens,
                                "temperature": self.temperature, "top_p": self.top_p,
                                "top_k": self.top_k, "seed": self.seed, "stop": list(self.stop),
                                **self.extra}
        if self.messages is not None:
            body["messages"] = [{"role": r, "content": c} for r, c in self.messages]
        else:
            body["prompt"] = self.prompt
        return body

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "prompt": self.prompt,
                "messages": [list(m) for m in self.messages] if self.messages else None,
                "max_tokens": self.max_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed,
                "stop": list(self.stop), "extra": self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobRequest:
        messages = d.get("messages")
        return cls(model=str(d["model"]), prompt=d.get("prompt"),
                   messages=tuple((str(r), str(c)) for r, c in messages) if messages else None,
                   max_tokens=int(d.get("max_tokens", 128)),
                   temperature=float(d.get("temperature", 0.7)),
                   top_p=float(d.get("top_p", 0.95)), top_k=int(d.get("top_k", 40)),
                   seed=d.get("seed"), stop=tuple(d.get("stop") or ()),
                   extra=dict(d.get("extra") or {}))
