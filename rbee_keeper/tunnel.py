"""Tunnels for llama.cpp RPC: a worker on one host reaches a lender on another host's
loopback through the SSH connections this controller already holds.

A lender listens on 127.0.0.1 only (its protocol has no authentication and no encryption).
`Tunnels.forward(borrower, lender, port)` gives a port on the borrower's loopback; each
connection made to it is carried to the lender's port:

    worker on B ──127.0.0.1:p──▶ B's sshd ══SSH══▶ controller ══SSH══▶ L's sshd ──▶ lender
                 (remote forward, -R)                         (direct-tcpip, -L)

A local host (the controller itself) listens or connects with a plain socket instead. The
tunnels live as long as this controller's `Tunnels` (the `rbee infer` that set them up, or
the queen), which is why a split worker and its lenders are stopped together with them.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import weakref
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from rbee_common.errors import RbeeError
from rbee_keeper.errors import TunnelFailed

log = logging.getLogger("rbee.keeper.tunnel")

CHUNK = 1 << 16
LOOPBACK = "127.0.0.1"


class Conn(Protocol):
    def recv(self, n: int) -> bytes: ...
    def sendall(self, data: bytes) -> Any: ...
    def close(self) -> None: ...


def _nodelay(sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def pump(a: Conn, b: Conn, name: str) -> None:
    """Copy bytes both ways until either side ends, then close both (RPC has no half-close)."""
    done = threading.Event()

    def one(src: Conn, dst: Conn) -> None:
        try:
            while not done.is_set():
                data = src.recv(CHUNK)
                if not data:
                    break
                dst.sendall(data)
        except (OSError, EOFError) as e:
            log.debug("%s: %s", name, e)
        finally:
            done.set()
            for c in (src, dst):
                _end(c)

    for src, dst in ((a, b), (b, a)):
        threading.Thread(target=one, args=(src, dst), name=name, daemon=True).start()


def _end(conn: Conn) -> None:
    """Close a connection so that its peer sees the end now: a socket is shut down first
    (close() alone leaves one that another thread blocks on in recv() open, and the lender
    busy); an SSH channel's close() sends its EOF and CLOSE itself."""
    if isinstance(conn, socket.socket):
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(Exception):
        conn.close()


class Side(Protocol):
    """One host as a tunnel end: where connections are accepted, or made."""

    name: str

    def listen(self, on_conn: Callable[[Conn], None]) -> tuple[int, Callable[[], None]]: ...
    def connect(self, port: int) -> Conn: ...


class LocalSide:
    """The controller's own host: a listening socket on loopback, plain connections."""

    def __init__(self, name: str) -> None:
        self.name = name

    def listen(self, on_conn: Callable[[Conn], None]) -> tuple[int, Callable[[], None]]:
        server = socket.create_server((LOOPBACK, 0))
        port = server.getsockname()[1]

        def accept() -> None:
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return  # closed
                _nodelay(conn)
                on_conn(conn)

        def close() -> None:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)  # wakes the accept() above (Linux)
            server.close()

        threading.Thread(target=accept, name=f"tunnel-accept-{port}", daemon=True).start()
        return port, close

    def connect(self, port: int) -> Conn:
        conn = socket.create_connection((LOOPBACK, port), timeout=10)
        conn.settimeout(None)
        _nodelay(conn)
        return conn


class SshSide:
    """A host over this controller's SSH connection: remote forwards and direct-tcpip."""

    # transport → forwarded port → handler (paramiko keeps one handler per transport)
    _routes: ClassVar[weakref.WeakKeyDictionary[Any, dict[int, Callable[[Conn], None]]]] = \
        weakref.WeakKeyDictionary()
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, name: str, transport: Callable[[], Any]) -> None:
        self.name = name
        self._transport = transport  # the live paramiko Transport (reconnects if needed)

    def listen(self, on_conn: Callable[[Conn], None]) -> tuple[int, Callable[[], None]]:
        import paramiko

        t = self._transport()
        _nodelay(t.sock)
        with self._lock:
            routes = self._routes.setdefault(t, {})

        def dispatch(channel: Any, origin: Any, server: Any) -> None:
            # paramiko keeps one handler per transport: route by the forwarded port
            fn = routes.get(int(server[1]))
            if fn is None:
                channel.close()
                return
            threading.Thread(target=fn, args=(channel,), daemon=True).start()

        try:
            port = t.request_port_forward(LOOPBACK, 0, handler=dispatch)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise TunnelFailed(f"{self.name}: its SSH server refused to forward a port "
                               f"({e or type(e).__name__})") from e
        with self._lock:
            routes[int(port)] = on_conn

        def close() -> None:
            with self._lock:
                routes.pop(int(port), None)
            with contextlib.suppress(Exception):
                t.cancel_port_forward(LOOPBACK, port)

        return int(port), close

    def connect(self, port: int) -> Conn:
        import paramiko

        t = self._transport()
        _nodelay(t.sock)
        try:
            return t.open_channel("direct-tcpip", (LOOPBACK, port), (LOOPBACK, 0), timeout=10)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise TunnelFailed(f"{self.name}: could not reach 127.0.0.1:{port} there through "
                               f"SSH ({e or type(e).__name__})") from e


class Tunnels:
    """The tunnels of one controller run; all closed together."""

    def __init__(self) -> None:
        self._closers: list[Callable[[], None]] = []
        self._conns: list[Conn] = []
        self._lock = threading.Lock()

    def forward(self, borrower: Side, lender: Side, port: int) -> int:
        """A port on the borrower's loopback whose connections reach `port` on the lender's."""
        name = f"tunnel {borrower.name}→{lender.name}:{port}"

        def on_conn(near: Conn) -> None:
            try:
                far = lender.connect(port)
            except RbeeError as e:
                log.warning("%s: %s", name, e.message)
                near.close()
                return
            with self._lock:
                self._conns += [near, far]
            pump(near, far, name)

        listen_port, closer = borrower.listen(on_conn)
        with self._lock:
            self._closers.append(closer)
        log.info("%s: listening on %s:%d", name, LOOPBACK, listen_port)
        return listen_port

    def close(self) -> None:
        with self._lock:
            closers, conns = self._closers, self._conns
            self._closers, self._conns = [], []
        for fn in closers:
            with contextlib.suppress(Exception):
                fn()
        for c in conns:
            _end(c)

    def __enter__(self) -> Tunnels:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def side_of(hive: Any) -> Side:
    """A host's tunnel end, by the command transport of its hive client (SSH or local)."""
    from rbee_keeper.transport import SshTransport

    transport = getattr(getattr(hive, "command_hive", hive), "transport", None)
    if isinstance(transport, SshTransport):
        return SshSide(hive.host.name, transport.paramiko_transport)
    return LocalSide(hive.host.name)
