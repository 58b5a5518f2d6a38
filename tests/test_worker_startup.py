"""The worker's start-up: the model loads while the HTTP stack imports, and nothing that
runs meanwhile loses its output (llama-cpp-python points stderr at /dev/null during a load)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx

from tests.test_worker_api import start_worker


def test_ready_log_and_uvicorn_warnings_reach_the_worker_log(tiny_model: Path,
                                                              tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    w = start_worker(tiny_model, log)
    try:
        host, port = w.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"NOT HTTP\x00\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 400")
        deadline = time.monotonic() + 5
        while "Invalid HTTP request" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        text = log.read_text()
        assert "ready on 127.0.0.1" in text and "the model took" in text
        assert httpx.get(f"{w.url}/health").json()["status"] == "ready"
    finally:
        w.proc.terminate()
        w.proc.wait(timeout=10)
