"""Small HTTP calls with the standard library: no client import on the hot paths."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any
from urllib.parse import urlsplit


class Connection(http.client.HTTPConnection):
    """An HTTPConnection that writes a request's headers and body in one write, TCP_NODELAY on.

    http.client writes the headers, then the body: two segments, and on a connection without
    TCP_NODELAY the body waits for the ACK of the headers, which the server may delay by 40 ms
    or more. One write cannot wait on anything; TCP_NODELAY keeps small writes from waiting.
    """

    def connect(self) -> None:
        super().connect()
        if self.sock is not None:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _send_output(self, message_body: Any = None, encode_chunked: bool = False) -> None:
        # http.client's one hook between the header lines and the body (stable since 3.6)
        if isinstance(message_body, bytes) and not encode_chunked:
            self._buffer.extend((b"", message_body))  # type: ignore[attr-defined]
            msg = b"\r\n".join(self._buffer)  # type: ignore[attr-defined]
            del self._buffer[:]  # type: ignore[attr-defined]
            self.send(msg)
            return
        super()._send_output(message_body, encode_chunked)  # type: ignore[misc]


def connect(url: str, timeout: float) -> Connection:
    """A connection to an http:// address (not yet opened; the first request opens it)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"not an http:// address: {url!r}")
    return Connection(parts.hostname, parts.port or 80, timeout=timeout)


def request_json(url: str, path: str, *, method: str = "GET", body: Any = None,
                 token: str | None = None, timeout: float = 2.0
                 ) -> tuple[int, dict[str, Any] | None]:
    """(status, JSON body or None); (0, None) when the server cannot be reached."""
    conn = connect(url, timeout)
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    payload = None
    if body is not None:
        payload = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            doc = None
        return resp.status, doc if isinstance(doc, dict) else None
    except (OSError, http.client.HTTPException):
        return 0, None
    finally:
        conn.close()


def get_health(url: str, timeout: float = 1.0) -> dict[str, Any] | None:
    status, doc = request_json(url, "/health", timeout=timeout)
    return doc if status == 200 else None
