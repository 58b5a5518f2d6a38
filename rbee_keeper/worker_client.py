"""Talking to a worker from the controller: /execute as a token stream, /cancel, /health.

Standard library only (http.client): a warm `rbee infer` must not pay for importing an
HTTP client. The stream ends with the worker's `end` event; a connection that ends
without one means the worker died (WORKER_CRASHED), never a hang.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rbee_common.errors import AllSlotsBusy, RbeeError, RemoteError, WorkerCrashed
from rbee_common.http import connect, request_json
from rbee_common.names import JobEvent
from rbee_common.sse import read_events

READ_TIMEOUT = 300.0  # longest silence between two events before the worker is presumed gone


@dataclass
class Stream:
    job_id: str
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    end: dict[str, Any] | None = None
    ttft_ms: float | None = None
    total_ms: float = 0.0


class Busy(AllSlotsBusy):
    """503 from the worker: busy (or still loading); retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _error_from(resp: http.client.HTTPResponse, url: str) -> RbeeError:
    raw = resp.read()
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and "error" in doc:
        err = RemoteError.from_envelope(doc)
        err.details.setdefault("worker", url)
        return err
    return RbeeError(f"{url}: HTTP {resp.status}")


def execute(url: str, token: str, body: dict[str, Any], on_text: Callable[[str], None],
            connect_timeout: float = 5.0, on_open: Callable[[], None] | None = None) -> Stream:
    """POST /execute and feed the tokens to `on_text` as they arrive; `on_open` runs once
    the worker has accepted the job (200), before its first event."""
    out = Stream(job_id=str(body["job_id"]))
    t0 = time.perf_counter()
    conn = connect(url, connect_timeout)
    try:
        conn.request("POST", "/execute", body=json.dumps(body).encode(), headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/json",
            "Accept": "text/event-stream"})
        resp = conn.getresponse()
    except (OSError, http.client.HTTPException) as e:
        conn.close()
        raise WorkerCrashed(f"cannot reach the worker at {url}: {e}", worker=url) from e
    try:
        if resp.status == 503:
            retry = float(resp.getheader("Retry-After") or 1)
            err = _error_from(resp, url)
            raise Busy(err.message, retry)
        if resp.status != 200:
            raise _error_from(resp, url)
        if on_open is not None:
            on_open()
        if conn.sock is not None:
            conn.sock.settimeout(READ_TIMEOUT)
        _read_events(resp, out, on_text, t0, url)
    finally:
        conn.close()
    out.total_ms = (time.perf_counter() - t0) * 1000
    return out


def _read_events(resp: http.client.HTTPResponse, out: Stream, on_text: Callable[[str], None],
                 t0: float, url: str) -> None:
    try:
        for event in read_events(resp):
            payload = event.json()
            if event.event == JobEvent.token:
                if out.ttft_ms is None:
                    out.ttft_ms = (time.perf_counter() - t0) * 1000
                out.tokens += 1
                out.text.append(payload["t"])
                on_text(payload["t"])
            elif event.event == JobEvent.end:
                out.end = payload
                return
            elif event.event == JobEvent.error:
                raise RemoteError(str(payload.get("code")), str(payload.get("message")),
                                  hint=str(payload.get("hint") or ""), worker=url)
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise WorkerCrashed(f"the worker at {url} broke off the stream after {out.tokens} "
                            f"tokens: {e or type(e).__name__}", worker=url,
                            tokens=out.tokens, text="".join(out.text)) from e
    raise WorkerCrashed(f"the worker at {url} closed the stream after {out.tokens} tokens "
                        "without finishing", worker=url, tokens=out.tokens,
                        text="".join(out.text))


def cancel(url: str, token: str, job_id: str) -> bool:
    status, _ = request_json(url, "/cancel", method="POST", body={"job_id": job_id},
                             token=token, timeout=2.0)
    return status == 202
