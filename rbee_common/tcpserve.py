"""Serving HTTP with every accepted connection tuned for latency (the worker, the pool
daemon and the queen all serve this way).

A request whose body is written after its headers (two writes, as many HTTP clients do)
can wait for TCP: a client with Nagle's algorithm on holds the body until the server ACKs
the headers, and Linux delays that ACK by 40 ms or more on a keep-alive connection that has
already answered a request. The server's own small writes (response headers, then one SSE
event a token) wait the same way without TCP_NODELAY, which asyncio sets only on sockets
made with proto IPPROTO_TCP (a plain `socket.socket()` has proto 0). So every connection
gets TCP_NODELAY, and TCP_QUICKACK is re-armed each time data arrives: Linux clears it by
itself, and setting it sends the pending ACK at once.
"""

from __future__ import annotations

import contextlib
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # asyncio costs 50 ms to import, before a worker's model load could start
    import asyncio

_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


def tune(sock: Any) -> None:
    """TCP_NODELAY and TCP_QUICKACK on a connected socket (best effort: not every OS has both)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    quickack(sock)


def quickack(sock: Any) -> None:
    """ACK what has arrived now rather than after the delayed-ACK timer (Linux)."""
    if _QUICKACK is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)


def http_protocol() -> type[asyncio.Protocol]:
    """uvicorn's own HTTP protocol class, tuning each connection as the module says."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class TunedHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
        _sock: Any = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self._sock = transport.get_extra_info("socket")
            if self._sock is not None:
                tune(self._sock)
            super().connection_made(transport)

        def data_received(self, data: bytes) -> None:
            if self._sock is not None:
                quickack(self._sock)
            super().data_received(data)

    return TunedHTTPProtocol
