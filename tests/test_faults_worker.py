"""Faults at a worker's HTTP edge, injected for real and bounded in time and count: clients
that leave at any moment (mid-body, while waiting for the slot, mid-answer, streaming or
not), bursts of OpenAI clients larger than the queue, a shutdown with requests waiting, and
hostile bodies on every route. After each, the worker must answer in JSON, count the request
and still serve: its one slot never leaks."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_worker_api import Worker, start_worker, wait_idle
from tests.test_worker_openai import counted, gauge, slot_held, until

SEED = 20261130  # the moments clients leave at: fixed, so a failure replays
ROUTES = ["/execute", "/v1/completions", "/v1/chat/completions"]
LABEL = {"/execute": "execute", "/v1/completions": "v1_completions",
         "/v1/chat/completions": "v1_chat"}


@pytest.fixture(scope="module")
def worker(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = start_worker(tiny_model, tmp_path_factory.mktemp("faults") / "worker.log", ctx=32768)
    yield w
    w.proc.terminate()
    w.proc.wait(timeout=10)


def long_body(path: str, stream: bool) -> dict[str, Any]:
    """A job that would run for 30000 tokens unless something stops it."""
    if path == "/v1/chat/completions":
        return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 30000,
                "stream": stream}
    body: dict[str, Any] = {"prompt": "Hello", "max_tokens": 30000}
    return body if path == "/execute" else {**body, "stream": stream}


def raw_request(w: Worker, path: str, body: bytes, declared: int | None = None) -> socket.socket:
    """Send a POST by hand, so the test decides when the client goes away."""
    host, port = w.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {w.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {declared or len(body)}\r\n\r\n")
    sock.sendall(head.encode() + body)
    return sock


def read_until(sock: socket.socket, needle: bytes, count: int) -> None:
    seen = b""
    while seen.count(needle) < count:
        chunk = sock.recv(65536)
        assert chunk, f"the answer ended early: {seen[-300:]!r}"
        seen += chunk


def still_serves(w: Worker) -> None:
    """The slot came back: a short job of each kind runs now."""
    wait_idle(w)
    r = httpx.post(f"{w.url}/v1/completions", headers=w.auth, timeout=30,
                   json={"prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "pq"
    assert gauge(w, "rbee_worker_waiting") == 0 and gauge(w, "rbee_worker_busy") == 0


# ---- clients that leave --------------------------------------------------------------------

_moments = random.Random(SEED)
LEAVE_CASES = [(path, stream, after)
               for path in ROUTES
               for stream in ([True] if path == "/execute" else [False, True])
               for after in sorted(_moments.sample([0.0, 0.01, 0.05, 0.2, 0.5], 2))]


@pytest.mark.parametrize("path, stream, after", LEAVE_CASES)
def test_a_client_that_leaves_mid_answer_frees_the_slot(worker: Worker, path: str,
                                                        stream: bool, after: float) -> None:
    wait_idle(worker)
    before = counted(worker, LABEL[path], "cancelled")
    sock = raw_request(worker, path, json.dumps(long_body(path, stream)).encode())
    if stream:
        read_until(sock, b"data:", 2)  # the answer has begun
    else:
        until(lambda: httpx.get(f"{worker.url}/health").json()["status"] == "busy")
    time.sleep(after)
    sock.close()
    until(lambda: counted(worker, LABEL[path], "cancelled") == before + 1)
    still_serves(worker)


@pytest.mark.parametrize("path", ROUTES)
def test_a_client_that_leaves_mid_body_starts_nothing(worker: Worker, path: str) -> None:
    wait_idle(worker)
    before = counted(worker, LABEL[path], "gone")
    body = json.dumps(long_body(path, False)).encode()
    sock = raw_request(worker, path, body[: len(body) // 2], declared=len(body))
    time.sleep(0.2)
    sock.close()
    until(lambda: counted(worker, LABEL[path], "gone") == before + 1)
    assert httpx.get(f"{worker.url}/health").json()["status"] == "ready"
    still_serves(worker)


@pytest.mark.parametrize("path", ROUTES[1:])
def test_a_client_that_leaves_while_waiting_gives_up_its_place(worker: Worker,
                                                               path: str) -> None:
    before = counted(worker, LABEL[path], "gone")
    with slot_held(worker):
        sock = raw_request(worker, path, json.dumps(long_body(path, False)).encode())
        until(lambda: gauge(worker, "rbee_worker_waiting") == 1)
        sock.close()
        until(lambda: gauge(worker, "rbee_worker_waiting") == 0)
        assert counted(worker, LABEL[path], "gone") == before + 1
    still_serves(worker)


# ---- more clients than the worker serves at once -------------------------------------------

def test_a_burst_of_openai_clients_is_served_in_turn(worker: Worker) -> None:
    completed = counted(worker, "v1_completions", "completed")
    results: list[int] = []

    def ask(n: int) -> None:
        r = httpx.post(f"{worker.url}/v1/completions", headers=worker.auth, timeout=60,
                       json={"prompt": "Hello", "max_tokens": 1 + n % 3, "temperature": 0})
        results.append(r.status_code)

    wait_idle(worker)
    threads = [threading.Thread(target=ask, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200] * 8
    assert counted(worker, "v1_completions", "completed") == completed + 8
    still_serves(worker)


def test_past_the_queue_limit_requests_get_503_at_once(worker: Worker) -> None:
    limit = 64  # WorkerSettings.queue_max
    statuses: dict[int, tuple[int, float]] = {}

    def ask(n: int) -> None:
        t0 = time.monotonic()
        r = httpx.post(f"{worker.url}/v1/completions", headers=worker.auth, timeout=60,
                       json={"prompt": "Hello", "max_tokens": 1})
        statuses[n] = (r.status_code, time.monotonic() - t0)

    with slot_held(worker):
        queued = [threading.Thread(target=ask, args=(n,)) for n in range(limit)]
        for t in queued:
            t.start()
        until(lambda: gauge(worker, "rbee_worker_waiting") == limit, timeout=30)
        for n in range(limit, limit + 3):
            ask(n)
            assert statuses[n][0] == 503 and statuses[n][1] < 5
    for t in queued:
        t.join(60)
    assert [statuses[n][0] for n in range(limit)] == [200] * limit
    still_serves(worker)


def test_shutdown_turns_waiting_requests_away(tiny_model: Path, tmp_path: Path) -> None:
    w = start_worker(tiny_model, tmp_path / "w.log", ctx=4096)
    answers: list[httpx.Response] = []

    def ask() -> None:
        answers.append(httpx.post(f"{w.url}/v1/completions", headers=w.auth, timeout=30,
                                  json={"prompt": "Hello", "max_tokens": 1}))

    try:
        with slot_held(w):
            waiters = [threading.Thread(target=ask) for _ in range(2)]
            for t in waiters:
                t.start()
            until(lambda: gauge(w, "rbee_worker_waiting") == 2)
            t0 = time.monotonic()
            assert httpx.post(f"{w.url}/shutdown", headers=w.auth).status_code == 202
            for t in waiters:
                t.join(15)
            assert time.monotonic() - t0 < 10
        assert [a.status_code for a in answers] == [503, 503]
        assert all("stopping" in a.json()["error"]["message"] for a in answers)
        assert w.proc.wait(timeout=15) == 0
    finally:
        if w.proc.poll() is None:
            w.proc.kill()


# ---- hostile bodies ------------------------------------------------------------------------

def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _hostile(path: str) -> list[tuple[str, bytes]]:
    """(name, body) pairs that must each get a JSON 4xx from `path`, never a 5xx."""
    chat = path == "/v1/chat/completions"
    base = '{"messages": [{"role": "user", "content": "hi"}], ' if chat else '{"prompt": "x", '
    cases = {
        "not JSON": b"{nope",
        "trailing comma": (base + '"max_tokens": 1,}').encode(),
        "a JSON array": b"[1, 2]",
        "a JSON string": b'"prompt"',
        "null": b"null",
        "empty": b"",
        "invalid UTF-8": b'{"prompt": "\xff\xfe"}',
        "depth 65": (base + '"max_tokens": ' + _deep(65) + "}").encode(),
        "depth 1000": (base + '"stop": ' + _deep(1000) + "}").encode(),
        "depth 100000": (base + '"seed": ' + _deep(100_000) + "}").encode(),
        "lone surrogate value": (base + '"stop": ["\\udc80"]}').encode(),
        "lone surrogate key": (base + '"\\ud800": 1}').encode(),
        "NaN temperature": (base + '"temperature": NaN}').encode(),
        "Infinity top_p": (base + '"top_p": Infinity}').encode(),
        "1e400 max_tokens": (base + '"max_tokens": 1e400}').encode(),
        "huge seed": (base + '"seed": ' + "9" * 5000 + "}").encode(),
        "negative max_tokens": (base + '"max_tokens": -1}').encode(),
        "stop of 10^5 strings": (base + '"stop": ' + json.dumps(["ab"] * 100_000) + "}"
                                 ).encode(),
        "a 1000-character stop": (base + '"stop": ["' + "s" * 1000 + '"]}').encode(),
        "logit_bias of 2000 tokens": (base + '"logit_bias": ' + json.dumps(
            {str(i): 1 for i in range(2000)}) + "}").encode(),
        "logit_bias out of range": (base + '"logit_bias": {"5": 1000}}').encode(),
        "logit_bias not a token": (base + '"logit_bias": {"../": 1}}').encode(),
        "schema of 10^9 characters": (base + '"response_format": ' + json.dumps(
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "string", "maxLength": 10**9}}}) + "}").encode(),
        "unknown response_format": (base + '"response_format": {"type": "yaml"}}').encode(),
        "a 2 MiB body": (base + '"stop": ["' + "x" * (2 * 1024 * 1024) + '"]}').encode(),
        "wrong messages": b'{"messages": [{"role": "wizard", "content": "hi"}]}',
        "content part not an object": b'{"messages": [{"role": "user", "content": [7]}]}',
    }
    if path == "/execute":
        cases["both prompt and messages"] = (
            b'{"prompt": "x", "messages": [{"role": "user", "content": "x"}]}')
        cases["job_id with a path"] = b'{"prompt": "x", "job_id": "../../etc/passwd"}'
    else:
        cases["tools"] = (base + '"tools": [{"type": "function"}]}').encode()
        cases["n of 10^6"] = (base + '"n": 1000000}').encode()
        cases["model as an object"] = (base + '"model": {"$ne": null}}').encode()
    return list(cases.items())


HOSTILE = [(path, name, body) for path in ROUTES for name, body in _hostile(path)]


@pytest.mark.parametrize("path, name, body", HOSTILE,
                         ids=[f"{p}:{n}" for p, n, _ in HOSTILE])
def test_a_hostile_body_gets_a_json_4xx_and_is_counted(worker: Worker, path: str, name: str,
                                                       body: bytes) -> None:
    label = LABEL[path]
    before = counted(worker, label, "invalid")
    r = httpx.post(f"{worker.url}{path}", content=body, timeout=30,
                   headers={**worker.auth, "Content-Type": "application/json"})
    assert r.status_code in (400, 413), (r.status_code, r.text[:300])
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert err["message"]
    if path.startswith("/v1/"):  # OpenAI's shape
        assert err["type"] == "invalid_request_error" and "param" in err
    assert counted(worker, label, "invalid") == before + 1
    assert worker.proc.poll() is None


def test_the_worker_serves_after_every_hostile_body(worker: Worker) -> None:
    still_serves(worker)
