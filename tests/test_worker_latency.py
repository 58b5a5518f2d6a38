"""TCP-level latency between clients and a real worker (tiny model): no request or token
waits on TCP's delayed ACK, whichever way the client writes its request."""

from __future__ import annotations

import json
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rbee_common.http import connect
from tests.test_worker_api import Worker, start_worker

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="TCP_INFO and delayed-ACK "
                                "timing are Linux's")


@pytest.fixture(scope="module")
def worker(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = start_worker(tiny_model, tmp_path_factory.mktemp("worker") / "worker.log")
    yield w
    w.proc.terminate()
    w.proc.wait(timeout=10)


def _request(worker: Worker) -> tuple[bytes, bytes]:
    """A POST /execute for two tokens: its headers and its body."""
    body = json.dumps({"prompt": "Hello", "max_tokens": 2, "temperature": 0}).encode()
    head = (f"POST /execute HTTP/1.1\r\nHost: w\r\nAuthorization: Bearer {worker.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head, body


def _connect(worker: Worker) -> socket.socket:
    host, port = worker.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)))


def _read_response(sock: socket.socket, t0: float, delay_acks: bool = False) -> float:
    """Read one chunked SSE response to its end; return ms to its first token event."""
    buf, first = b"", None
    while not buf.endswith(b"\r\n0\r\n\r\n"):
        data = sock.recv(65536)
        if delay_acks:  # Linux clears it as it pleases: set it again after every read
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
        assert data, buf
        buf += data
        if first is None and b"event: token" in buf:
            first = (time.perf_counter() - t0) * 1000
    assert buf.startswith(b"HTTP/1.1 200"), buf[:200]
    assert first is not None, buf
    return first


@linux_only
def test_body_written_after_headers_does_not_wait_for_a_delayed_ack(worker: Worker) -> None:
    # Headers, then body, in two writes with Nagle on, over a keep-alive connection that has
    # already answered a request: the body leaves only once the headers are ACKed, and
    # Linux delays that ACK by at least 40 ms unless the worker asks for it at once.
    head, body = _request(worker)
    with _connect(worker) as sock:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        sock.sendall(head + body)  # a first request: the connection is now keep-alive
        _read_response(sock, time.perf_counter())
        firsts = []
        for _ in range(5):
            t0 = time.perf_counter()
            sock.sendall(head)
            sock.sendall(body)
            firsts.append(_read_response(sock, t0))
    # the best of five: a busy machine only adds time, a delayed ACK never takes less than 40 ms
    assert min(firsts) < 25, firsts


@linux_only
def test_tokens_do_not_wait_for_a_client_that_delays_its_acks(worker: Worker) -> None:
    # A client in delayed-ACK mode (as a keep-alive client often is) ACKs the response
    # headers late; without TCP_NODELAY the worker holds the first token behind them.
    head, body = _request(worker)
    firsts = []
    for _ in range(5):
        with _connect(worker) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
            t0 = time.perf_counter()
            sock.sendall(head + body)
            firsts.append(_read_response(sock, t0, delay_acks=True))
    assert min(firsts) < 25, firsts


def _data_segments_out(sock: socket.socket) -> int:
    """Segments with new data this socket sent (retransmissions, e.g. tail-loss probes, not)."""
    # struct tcp_info: tcpi_total_retrans is the u32 at byte 100, tcpi_data_segs_out the one
    # at byte 156 (Linux 4.6+)
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    (retrans,), (out,) = struct.unpack_from("I", info, 100), struct.unpack_from("I", info, 156)
    return int(out - retrans)


@linux_only
def test_rbee_clients_send_a_request_in_one_segment_with_nodelay(worker: Worker) -> None:
    conn = connect(worker.url, timeout=5)
    try:
        conn.request("POST", "/cancel", body=json.dumps({"job_id": "nothing"}).encode(),
                     headers={"Authorization": f"Bearer {worker.token}",
                              "Content-Type": "application/json"})
        assert conn.sock is not None
        assert conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        resp = conn.getresponse()
        assert resp.status == 202 and json.loads(resp.read())["cancelling"] is False
        assert _data_segments_out(conn.sock) == 1  # read once the worker has answered it all
    finally:
        conn.close()
