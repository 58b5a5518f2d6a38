"""What the queen holds in memory: live jobs (with their event logs and listeners), the
workers it manages, and its view of each host."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from rbee_keeper.infer import Cancel
from rbee_keeper.jobs import FINAL_STATES, JobEventName, JobRequest, JobState

Event = tuple[int, str, dict[str, Any]]


class Listener:
    """One SSE client of a job: events are handed to its asyncio loop as they happen."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


@dataclass
class LiveJob:
    id: str
    request: JobRequest
    source: str
    state: JobState
    model_id: str = ""  # the model's id (what workers are keyed by), from request.model
    created: float = field(default_factory=time.time)
    cancel: Cancel = field(default_factory=Cancel)
    events: list[Event] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    placement: dict[str, Any] | None = None
    host: str | None = None
    worker: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    started_at: float | None = None
    attempts: int = 0  # placements retried after a host refused what its picture promised
    first_token_at: float | None = None
    saved_seq: int = -1  # its events up to this one are in the store (tokens are saved by the
    saved_at: float = 0.0  # second while it streams, and when it ends)
    _listeners: list[Listener] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def next_event(self, name: JobEventName, data: dict[str, Any]) -> Event:
        """Append an event (numbered) and hand it to every listener at once."""
        with self._lock:
            seq = self.events[-1][0] + 1 if self.events else 0
            event = (seq, name.value, data)
            self.events.append(event)
            listeners = list(self._listeners)
        for listener in listeners:
            listener.put(event)
        return event

    def listen(self, loop: asyncio.AbstractEventLoop, after: int) -> tuple[list[Event], Listener]:
        """The events after `after` so far, and a listener for the ones still to come."""
        listener = Listener(loop)
        with self._lock:
            past = [e for e in self.events if e[0] > after]
            self._listeners.append(listener)
        return past, listener

    def has_listeners(self) -> bool:
        with self._lock:
            return bool(self._listeners)

    def unlisten(self, listener: Listener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state.value, "model": self.request.model,
                "source": self.source, "created": self.created, "host": self.host,
                "worker": self.worker, "tokens": self.tokens, "error": self.error}


@dataclass
class ManagedWorker:
    """A worker the queen started (or adopted) and schedules jobs onto."""

    host: str
    id: str
    url: str
    token: str
    model: str
    backend: str
    devices: tuple[int, ...]
    ctx: int
    state: str = "idle"  # starting | idle | busy
    started: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    requests: int = 0
    tokens: int = 0
    last_tokens_per_sec: float = 0.0
    estimate_bytes: int = 0

    def to_dict(self, secret: bool = False) -> dict[str, Any]:
        doc = {"host": self.host, "id": self.id, "url": self.url, "model": self.model,
               "backend": self.backend, "device": self.devices[0], "devices": list(self.devices),
               "ctx": self.ctx, "state": self.state, "started": self.started,
               "last_used": self.last_used, "requests": self.requests, "tokens": self.tokens,
               "tokens_per_sec": self.last_tokens_per_sec, "estimate_bytes": self.estimate_bytes}
        if secret:
            doc["token"] = self.token
        return doc

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ManagedWorker:
        return cls(host=d["host"], id=d["id"], url=d["url"], token=d["token"], model=d["model"],
                   backend=d["backend"], devices=tuple(d["devices"]), ctx=int(d["ctx"]),
                   state="idle", started=float(d["started"]), last_used=float(d["last_used"]),
                   requests=int(d.get("requests", 0)), tokens=int(d.get("tokens", 0)),
                   last_tokens_per_sec=float(d.get("tokens_per_sec", 0.0)),
                   estimate_bytes=int(d.get("estimate_bytes", 0)))


@dataclass
class HostView:
    """The queen's latest picture of one host."""

    name: str
    status: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    seen: float = 0.0  # last successful status
    checked: float = 0.0  # last attempt
    source: str = "ssh"  # ssh | daemon | heartbeat | local

    def to_dict(self, now: float) -> dict[str, Any]:
        return {"name": self.name, "ok": self.error is None and self.status is not None,
                "source": self.source,
                "age_s": round(now - self.seen, 1) if self.seen else None,
                "checked_s": round(now - self.checked, 1) if self.checked else None,
                "status": self.status, "error": self.error}
