"""A real queen process for tests: `python -m rbee_keeper.queen` on a free loopback port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import sse_events


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class QueenProc:
    def __init__(self, config: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.args = list(args)
        self.env = env or {}
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        return (self.config / "queen.token").read_text().strip()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start(self, timeout: float = 30.0) -> QueenProc:
        log = open(self.config / "queen-test.log", "ab")  # noqa: SIM115 (lives with the queen)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rbee_keeper.queen", "--port", str(self.port), *self.args],
            stdout=log, stderr=log, env={**os.environ, **self.env})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("queen exited: "
                                   + (self.config / "queen-test.log").read_text()[-3000:])
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("queen did not answer /health")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers, timeout=30, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self.headers, timeout=30, **kw)

    def submit(self, **body: Any) -> str:
        r = self.post("/v2/tasks", body)
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    def events(self, job_id: str, after: int = -1) -> Iterator[tuple[str, Any]]:
        headers = {**self.headers, "Last-Event-ID": str(after)}
        with httpx.stream("GET", f"{self.url}/v2/tasks/{job_id}/events", headers=headers,
                          timeout=120) as r:
            assert r.status_code == 200, r.read()
            for event, data in sse_events(r.iter_lines()):
                yield event, data
                if event in ("end", "error"):
                    return

    def wait(self, job_id: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            doc = self.get(f"/v2/tasks/{job_id}").json()
            if doc["state"] in ("done", "failed", "cancelled"):
                return dict(doc)
            time.sleep(0.1)
        raise AssertionError(f"{job_id} did not finish: {json.dumps(doc)[:500]}")

    def state(self) -> dict[str, Any]:
        return dict(self.get("/v2/state").json())
