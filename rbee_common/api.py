"""A client of an rbee daemon's HTTP API (the pool daemon's: used by the hive CLI on its host
and by the keeper): bearer token, JSON documents, progress as server-sent events, and the
daemon's error envelopes raised as the errors they describe, exit codes included.

Standard library only (http.client): `rbee-hive status` runs through it while a daemon runs.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from rbee_common.errors import RbeeError, RemoteError
from rbee_common.names import PROGRESS_EVENTS, ProgressEvent
from rbee_common.progress import Reporter
from rbee_common.sse import SseEvent, read_events

Doc = dict[str, Any]

CONNECT_TIMEOUT = 2.0


class DaemonUnreachable(RbeeError):
    """Nothing answers at the daemon's address; nothing was sent, so another way is safe."""

    code = "DAEMON_UNREACHABLE"
    default_hint = "Is it running? `rbee-hive daemon status` on that host."


class DaemonConnectionLost(DaemonUnreachable):
    """The daemon went away during a call: whether it did the work is not known."""

    default_hint = "Check the result, e.g. `rbee-hive worker list`, before trying again."


def error_of(doc: Any, status: int, what: str) -> RbeeError:
    """The error an error response describes (its envelope, and the exit code it carries)."""
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        code = doc.get("exit_code")
        return RemoteError.from_envelope(doc, exit_code=code if isinstance(code, int) else 1)
    return RbeeError(f"{what}: the daemon answered HTTP {status}")


class ApiClient:
    """Calls to one daemon: `url` (http://host:port) with its bearer `token`."""

    def __init__(self, url: str, token: str, *, connect_timeout: float = CONNECT_TIMEOUT,
                 timeout: float = 60.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"not an http:// address: {url!r}")
        self.url = url.rstrip("/")
        self.token = token
        self._host, self._port = parts.hostname, parts.port or 80
        self.connect_timeout = connect_timeout
        self.timeout = timeout

    def _open(self, method: str, path: str, body: Any, accept: str,
              timeout: float | None) -> tuple[http.client.HTTPConnection,
                                               http.client.HTTPResponse]:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self.connect_timeout)
        what = f"{method} {self.url}{path.split('?')[0]}"
        try:
            conn.connect()
        except OSError as e:
            conn.close()
            raise DaemonUnreachable(f"{what}: {e.strerror or e}", url=self.url) from e
        assert conn.sock is not None
        conn.sock.settimeout(self.timeout if timeout is None else timeout)
        headers = {"Authorization": f"Bearer {self.token}", "Accept": accept}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=payload, headers=headers)
            return conn, conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            if method == "GET" and isinstance(e, ConnectionError | http.client.RemoteDisconnected):
                # closed before answering a read: as good as not there
                raise DaemonUnreachable(f"{what}: {e}", url=self.url) from e
            raise DaemonConnectionLost(f"{what}: {e or type(e).__name__}", url=self.url) from e

    def json(self, method: str, path: str, body: Any = None,
             timeout: float | None = None) -> Doc:
        """One request, one JSON document back; an error response is raised."""
        conn, resp = self._open(method, path, body, "application/json", timeout)
        try:
            raw = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise DaemonConnectionLost(f"{method} {self.url}{path}: {e}", url=self.url) from e
        finally:
            conn.close()
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            doc = None
        if resp.status >= 400 or not isinstance(doc, dict):
            raise error_of(doc, resp.status, f"{method} {path}")
        return doc

    def events(self, method: str, path: str, body: Any = None,
               timeout: float | None = None) -> Iterator[SseEvent]:
        """A text/event-stream call: connects now (so DaemonUnreachable is raised here), then
        yields its events as they arrive."""
        conn, resp = self._open(method, path, body, "text/event-stream", timeout)
        if resp.status != 200:
            try:
                raw = resp.read()
            finally:
                conn.close()
            try:
                doc = json.loads(raw) if raw else None
            except ValueError:
                doc = None
            raise error_of(doc, resp.status, f"{method} {path}")

        def stream() -> Iterator[SseEvent]:
            try:
                yield from read_events(resp)
            except (OSError, http.client.HTTPException) as e:
                raise DaemonConnectionLost(f"{method} {self.url}{path}: the stream broke: {e}",
                                           url=self.url) from e
            finally:
                conn.close()

        return stream()

    def with_progress(self, method: str, path: str, body: Any = None,
                      on_event: Reporter | None = None, timeout: float | None = None) -> Doc:
        """A long call: its progress events to `on_event`, then its result (or its error)."""
        for event in self.events(method, path, body, timeout):
            if event.event in PROGRESS_EVENTS:
                if on_event is not None:
                    on_event(event.json())
            elif event.event == ProgressEvent.result:
                return dict(event.json())
            elif event.event == ProgressEvent.error:
                raise error_of(event.json(), 500, f"{method} {path}")
        raise DaemonConnectionLost(f"{method} {self.url}{path}: the stream ended without a "
                                   "result", url=self.url)

    def lines(self, path: str, timeout: float | None = None) -> Iterator[str]:
        """The `line` events of a followed log until the stream ends (connects now)."""
        events = self.events("GET", path, timeout=timeout)

        def each() -> Iterator[str]:
            for event in events:
                if event.event == ProgressEvent.line:
                    yield str(event.json().get("line", ""))
                elif event.event == ProgressEvent.error:
                    raise error_of(event.json(), 500, f"GET {path}")

        return each()
