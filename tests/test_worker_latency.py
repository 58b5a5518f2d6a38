"""TCP-level latency between clients and a real worker (tiny model): no request or stream
waits on TCP's delayed ACK, whichever way the client writes and ACKs."""

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


def _tcp_info(sock: socket.socket, offset: int) -> int:
    # struct tcp_info (Linux): tcpi_total_retrans is the u32 at byte 100, tcpi_notsent_bytes
    # at 144 and tcpi_data_segs_out at 156 (Linux 4.6+)
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int(struct.unpack_from("I", info, offset)[0])


def _read_response(sock: socket.socket, delay_acks: bool = False) -> list[tuple[float, bytes]]:
    """Read one chunked SSE response to its end: (arrival time, bytes) of every read."""
    reads: list[tuple[float, bytes]] = []
    while not b"".join(d for _, d in reads).endswith(b"\r\n0\r\n\r\n"):
        data = sock.recv(65536)
        if delay_acks:  # Linux clears it as it pleases: set it again after every read
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
        assert data, reads
        reads.append((time.perf_counter(), data))
    whole = b"".join(d for _, d in reads)
    assert whole.startswith(b"HTTP/1.1 200") and b'"t": "p"' in whole, whole[:400]
    return reads


# Each test times the TCP step itself, not the model, and keeps the best of five tries: a
# busy machine only adds time, and Linux's delayed-ACK timer never fires before 40 ms.

@linux_only
def test_body_written_after_headers_does_not_wait_for_a_delayed_ack(worker: Worker) -> None:
    # Headers, then body, in two writes with Nagle on, over a keep-alive connection that has
    # already answered a request: the body leaves only once the headers are ACKed, and
    # Linux delays that ACK unless the worker asks for it at once.
    head, body = _request(worker)
    with _connect(worker) as sock:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        sock.sendall(head + body)  # a first request: the connection is now keep-alive
        _read_response(sock)
        waits = []
        for _ in range(6):
            sock.sendall(head)
            t0 = time.perf_counter()
            sock.sendall(body)
            while _tcp_info(sock, 144):  # the body waits in our send queue
                time.sleep(0.0002)
            waits.append((time.perf_counter() - t0) * 1000)
            _read_response(sock)
    # the first of them may find the worker's ACK state as the one-write request left it
    assert min(waits[1:]) < 20, waits


@linux_only
def test_tokens_do_not_wait_for_a_client_that_delays_its_acks(worker: Worker) -> None:
    # A client in delayed-ACK mode (as a keep-alive client often is) ACKs the response
    # headers late; without TCP_NODELAY the worker holds its next write, the stream's first
    # event, until that ACK comes. The worker writes the two back to back.
    head, body = _request(worker)
    gaps = []
    for _ in range(5):
        with _connect(worker) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
            sock.sendall(head + body)
            reads = _read_response(sock, delay_acks=True)
        at_headers = next(t for t, d in reads if b"\r\n\r\n" in d)
        seen = b""
        for t, d in reads:
            seen += d
            if b"event: started" in seen:
                gaps.append((t - at_headers) * 1000)
                break
    assert min(gaps) < 20, gaps


def _data_segments_out(sock: socket.socket) -> int:
    """Segments with new data this socket sent (retransmissions, e.g. tail-loss probes, not)."""
    return _tcp_info(sock, 156) - _tcp_info(sock, 100)


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
