"""Tunnels to RPC lenders through the controller's SSH connections, over real sshd hosts."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
from collections.abc import Iterator

import pytest

from rbee_keeper.hive import Session
from rbee_keeper.hosts import select
from rbee_keeper.tunnel import LocalSide, Tunnels, side_of
from tests.conftest import SshPool

pytestmark = pytest.mark.ssh


class Echo:
    """A loopback TCP server that answers every chunk with the chunk (a stand-in lender's
    port is not needed: this is the byte pipe under test, not llama.cpp)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.ended = threading.Semaphore(0)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            while data := conn.recv(65536):
                conn.sendall(data)
        self.ended.release()  # the client's end reached the server

    def close(self) -> None:
        """Go away as a killed process would: every connection ends at once."""
        for s in (self.server, *self.conns):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # close() alone leaves a blocked recv() waiting
            s.close()


@pytest.fixture
def echo() -> Iterator[Echo]:
    e = Echo()
    yield e
    e.close()


def roundtrip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        got = bytearray()
        sender = threading.Thread(target=s.sendall, args=(payload,))
        sender.start()
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        sender.join()
        return bytes(got)


@pytest.mark.parametrize("ends", ["ssh→ssh", "local→ssh", "ssh→local"])
def test_a_tunnel_carries_bytes_intact_between_two_hosts(ssh_pool: SshPool, echo: Echo,
                                                          ends: str) -> None:
    ssh_pool.start(2)
    hosts = select(["h1", "h2"])
    payload = os.urandom(3 * 1024 * 1024 + 17)  # more than one SSH window
    with Session() as session, Tunnels() as tunnels:
        h1, h2 = side_of(session.hive(hosts["h1"])), side_of(session.hive(hosts["h2"]))
        borrower, lender = {"ssh→ssh": (h1, h2), "local→ssh": (LocalSide("here"), h2),
                            "ssh→local": (h1, LocalSide("here"))}[ends]
        port = tunnels.forward(borrower, lender, echo.port)
        assert port != echo.port
        back = roundtrip(port, payload)
        assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
        assert roundtrip(port, b"again") == b"again"  # one tunnel, many connections
    with pytest.raises(OSError):  # closed with its Tunnels: nothing listens there any more
        roundtrip(port, b"x")


def test_two_tunnels_into_one_host_reach_their_own_ports(ssh_pool: SshPool) -> None:
    ssh_pool.start(2)
    hosts = select(["h1", "h2"])
    a, b = Echo(), Echo()
    try:
        with Session() as session, Tunnels() as tunnels:
            h1, h2 = side_of(session.hive(hosts["h1"])), side_of(session.hive(hosts["h2"]))
            pa = tunnels.forward(h1, h2, a.port)
            pb = tunnels.forward(h1, h2, b.port)
            assert roundtrip(pa, b"to a") == b"to a" and roundtrip(pb, b"to b") == b"to b"
            assert len(a.conns) == 1 and len(b.conns) == 1  # each went to its own server
    finally:
        a.close()
        b.close()


def test_a_lender_that_goes_away_closes_the_borrowers_connection(ssh_pool: SshPool,
                                                                 echo: Echo) -> None:
    ssh_pool.start(2)
    hosts = select(["h1", "h2"])
    with Session() as session, Tunnels() as tunnels:
        h1, h2 = side_of(session.hive(hosts["h1"])), side_of(session.hive(hosts["h2"]))
        port = tunnels.forward(h1, h2, echo.port)
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(b"ping")
            assert s.recv(16) == b"ping"
            echo.close()  # the lender dies
            assert s.recv(16) == b""  # the worker sees the end, not a hang


@pytest.mark.parametrize("ends", ["ssh→local", "local→local", "ssh→ssh"])
def test_a_borrower_that_hangs_up_frees_the_lender_at_once(ssh_pool: SshPool, echo: Echo,
                                                           ends: str) -> None:
    # a lender serves one client at a time: a connection the relay keeps open after the
    # worker (or a handshake) left would make it refuse the next one as busy
    ssh_pool.start(2)
    hosts = select(["h1", "h2"])
    with Session() as session, Tunnels() as tunnels:
        h1, h2 = side_of(session.hive(hosts["h1"])), side_of(session.hive(hosts["h2"]))
        borrower, lender = {"ssh→local": (h1, LocalSide("here")),
                            "local→local": (LocalSide("a"), LocalSide("b")),
                            "ssh→ssh": (h1, h2)}[ends]
        port = tunnels.forward(borrower, lender, echo.port)
        for _ in range(3):
            assert roundtrip(port, b"hello") == b"hello"
            assert echo.ended.acquire(timeout=5), "the lender still holds the connection"

