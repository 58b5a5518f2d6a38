"""The daemon's eyes: it looks at the host every second (a worker that died is marked dead,
with the reason its log gives, as `worker list` does) and pushes the host's status document to
the queen, when one is configured, every few seconds and at once when something changed.

A queen that is down never disturbs the daemon: heartbeats go from their own thread, a
failure is logged once (and the recovery once), and the next one is tried on schedule.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from rbee_common import __version__
from rbee_hive import schemas
from rbee_hive.daemon.service import reap

log = logging.getLogger("rbee.hive.daemon")

Doc = dict[str, Any]

WATCH_INTERVAL = 1.0
# below the queen's default poll interval (2 s), so a host with a daemon is never polled
HEARTBEAT_INTERVAL = 1.5


@dataclass(frozen=True)
class QueenSettings:
    """Where heartbeats go: RBEE_QUEEN_URL, RBEE_QUEEN_TOKEN, and RBEE_HOST_NAME (this host's
    name in the controller's hosts.toml)."""

    url: str
    token: str
    host: str

    @classmethod
    def from_env(cls) -> QueenSettings | None:
        url = (os.environ.get("RBEE_QUEEN_URL") or "").rstrip("/")
        if not url:
            return None
        token = os.environ.get("RBEE_QUEEN_TOKEN") or ""
        if not token:
            log.warning("RBEE_QUEEN_URL is set but RBEE_QUEEN_TOKEN is not: no heartbeats")
            return None
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
            log.warning("RBEE_QUEEN_URL %r is not an http(s):// address: no heartbeats", url)
            return None
        host = os.environ.get("RBEE_HOST_NAME") or ""
        if not host:
            host = socket.gethostname()
            log.warning("RBEE_HOST_NAME is not set: heartbeats name this host %r", host)
        return cls(url, token, host)


def signature(doc: Doc) -> tuple[Any, ...]:
    """What counts as a change worth telling the queen at once: a worker's state, a model."""
    return (tuple(sorted((w["id"], w["state"]) for w in doc["workers"])),
            tuple(sorted(m["id"] for m in doc["models"])))


class QueenLink:
    """Heartbeats to the queen from their own thread: the latest status, when due or urgent."""

    def __init__(self, settings: QueenSettings, every: float = HEARTBEAT_INTERVAL,
                 daemon_url: str | None = None, timeout: float = 3.0) -> None:
        self.settings = settings
        self.every = every
        self.daemon_url = daemon_url
        self.timeout = timeout
        self._cond = threading.Condition()
        self._doc: Doc | None = None
        self._urgent = False
        self._stopping = False
        self._last = 0.0
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self.sent = 0
        self.failed = 0
        self.last_ok: float | None = None
        self.last_error: str | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=self.timeout + 1)

    def offer(self, doc: Doc, urgent: bool = False) -> None:
        """The newest status; `urgent` sends it now rather than on schedule."""
        with self._cond:
            self._doc = doc
            self._urgent = self._urgent or urgent
            self._cond.notify_all()

    def summary(self) -> Doc:
        return {"url": self.settings.url, "host": self.settings.host, "sent": self.sent,
                "failed": self.failed, "last_ok_at": self.last_ok, "last_error": self.last_error}

    def _due_in(self) -> float | None:
        """Seconds until the next heartbeat is due (0: now); None while there is nothing."""
        if self._doc is None:
            return None
        if self._urgent:
            return 0.0
        return max(0.0, self._last + self.every - time.monotonic())

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (wait := self._due_in()) != 0.0:
                    self._cond.wait(timeout=wait)
                if self._stopping:
                    return
                doc, self._urgent = self._doc, False
                self._last = time.monotonic()
            assert doc is not None
            self.push(doc)

    def push(self, doc: Doc) -> bool:
        """POST /v2/heartbeat; True when the queen took it. Failures are logged, not raised."""
        body = {"host": self.settings.host, "status": doc, "daemon_url": self.daemon_url,
                "daemon_version": __version__}
        error = self._post(json.dumps(body).encode())
        if error is None:
            if self.last_error is not None:
                log.info("heartbeats reach the queen at %s again", self.settings.url)
            self.sent += 1
            self.last_ok, self.last_error = time.time(), None
            return True
        if self.last_error is None:
            log.warning("heartbeat to the queen at %s failed: %s (trying again every %gs)",
                        self.settings.url, error, self.every)
        self.failed += 1
        self.last_error = error
        return False

    def _post(self, payload: bytes) -> str | None:
        parts = urlsplit(self.settings.url)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(parts.hostname or "", parts.port, timeout=self.timeout)
        try:
            conn.request("POST", parts.path.rstrip("/") + "/v2/heartbeat", body=payload,
                         headers={"Authorization": f"Bearer {self.settings.token}",
                                  "Content-Type": "application/json"})
            resp = conn.getresponse()
            said = resp.read()
            return None if resp.status < 300 else refusal(resp.status, said)
        except (OSError, http.client.HTTPException) as e:
            return str(e) or type(e).__name__
        finally:
            conn.close()


class Watcher:
    """Looks at the host every `interval` seconds, or at once when poked (a worker was
    started or stopped here); hands each status to the queen link."""

    def __init__(self, status: Callable[[], Doc], interval: float = WATCH_INTERVAL,
                 link: QueenLink | None = None) -> None:
        self.status = status
        self.interval = interval
        self.link = link
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watcher", daemon=True)
        self._states: dict[str, str] = {}
        self._signature: tuple[Any, ...] | None = None
        self.last_tick: float | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def poke(self) -> None:
        """Look again now (something changed)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                self.tick()
            except Exception:  # a bad tick must not end the watching
                log.exception("looking at the workers failed; trying again")
            self._wake.wait(self.interval)

    def tick(self) -> Doc:
        """One look: refresh every worker (dead ones are marked), reap, tell the queen."""
        doc = self.status()
        states = {}
        for w in doc["workers"]:
            states[w["id"]] = w["state"]
            if w["state"] in schemas.LIVE_STATES:
                continue
            reap(int(w["pid"]))
            if self._states.get(w["id"], w["state"]) != w["state"]:
                log.warning("worker %s is %s: %s", w["id"], w["state"], w.get("message"))
        self._states = states
        sig = signature(doc)
        if self.link is not None:
            self.link.offer(doc, urgent=sig != self._signature)
        self._signature = sig
        self.last_tick = time.time()
        return doc


def refusal(status: int, body: bytes) -> str:
    """Why the queen refused a heartbeat, in a line: its error's code and message, if any."""
    from rbee_common.textsafe import clean

    try:
        err = json.loads(body)["error"]
        return clean(f"HTTP {status}: {err['code']}: {err['message']}")[:300]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}"
