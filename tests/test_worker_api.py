"""llm-worker-rbee's HTTP API (DESIGN.md §4) against a real worker on the tiny model."""

from __future__ import annotations

import contextlib
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers import BIN, sse_events


@dataclass
class Worker:
    url: str
    token: str
    proc: subprocess.Popen[bytes]

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_worker(model: Path, log: Path, ctx: int = 8192,
                 env: dict[str, str] | None = None) -> Worker:
    token = secrets.token_urlsafe(24)
    port = free_port()
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [str(BIN / "llm-worker-rbee"), "--model", str(model), "--backend", "cpu",
             "--port", str(port), "--worker-id", "api-test", "--ctx", str(ctx),
             "--model-id", "tiny"],
            env={"RBEE_WORKER_TOKEN": token, "PATH": "/usr/bin:/bin", **(env or {})},
            stdout=f, stderr=f)
    w = Worker(f"http://127.0.0.1:{port}", token, proc)
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{w.url}/health").json()["status"] == "ready":
                return w
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


@pytest.fixture(scope="module")
def worker(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = start_worker(tiny_model, tmp_path_factory.mktemp("worker") / "worker.log")
    yield w
    w.proc.terminate()
    w.proc.wait(timeout=10)


def execute(w: Worker, **body: object) -> list[tuple[str, dict]]:
    with httpx.stream("POST", f"{w.url}/execute", json=body, headers=w.auth, timeout=30) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return list(sse_events(r.iter_lines()))


def wait_idle(w: Worker) -> None:
    deadline = time.monotonic() + 10
    while httpx.get(f"{w.url}/health").json()["status"] != "ready":
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_health_needs_no_token_and_says_who_it_is(worker: Worker) -> None:
    h = httpx.get(f"{worker.url}/health").json()
    assert h["schema"] == "rbee.worker.health/v1"
    assert {k: h[k] for k in ("status", "worker_id", "model", "backend", "device", "ctx")} == {
        "status": "ready", "worker_id": "api-test", "model": "tiny", "backend": "cpu",
        "device": 0, "ctx": 8192}
    assert h["vram_bytes"] == 0 and h["uptime_s"] > 0


@pytest.mark.parametrize("method, path", [
    ("POST", "/execute"), ("POST", "/cancel"), ("GET", "/metrics"), ("POST", "/shutdown"),
    ("GET", "/v1/models"), ("GET", "/v1/models/tiny"), ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
])
@pytest.mark.parametrize("header", [None, "Bearer wrong-token-wrong-token", "Basic abc"])
def test_every_route_but_health_needs_the_token(worker: Worker, method: str, path: str,
                                                header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    r = httpx.request(method, f"{worker.url}{path}", json={}, headers=headers)
    assert r.status_code == 401
    err = r.json()["error"]
    if path.startswith("/v1/"):  # OpenAI's shape, rbee's code beside it
        assert (err["type"], err["code"], err["rbee_code"]) == (
            "authentication_error", "invalid_api_key", "UNAUTHORIZED")
    else:
        assert err["code"] == "UNAUTHORIZED"
    assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{worker.url}/health").json()["status"] == "ready"  # still alive


def test_execute_streams_started_tokens_end(worker: Worker) -> None:
    events = execute(worker, prompt="Hello", max_tokens=12, job_id="j-1", temperature=0.7,
                     seed=7)
    kinds = [e for e, _ in events]
    assert kinds[0] == "started" and kinds[-1] == "end" and set(kinds[1:-1]) == {"token"}
    assert events[0][1] == {"job_id": "j-1", "model": "tiny"}
    text = "".join(d["t"] for e, d in events if e == "token")
    assert text == "pqrstuvwxyz "
    assert [d["i"] for e, d in events if e == "token"] == list(range(12))
    end = events[-1][1]
    assert end["stop_reason"] == "MAX_TOKENS" and end["tokens_out"] == 12
    assert end["ttft_ms"] > 0 and end["tokens_per_sec"] > 0 and end["decode_ms"] > 0


def test_eos_and_stop_sequences(worker: Worker) -> None:
    eos = execute(worker, prompt="Hi there!", max_tokens=50)
    assert "".join(d["t"] for e, d in eos if e == "token") == "KO"
    assert eos[-1][1]["stop_reason"] == "EOS" and eos[-1][1]["tokens_out"] == 2

    stop = execute(worker, prompt="Hello", max_tokens=50, stop=["wxy", "zz"])
    text = "".join(d["t"] for e, d in stop if e == "token")
    assert text == "pqrstuv"  # "w" was held back until it was clear it starts "wxy"
    assert stop[-1][1]["stop_reason"] == "STOP_SEQUENCE"


@pytest.mark.parametrize("body, field", [
    ({"max_tokens": 5}, "prompt"),
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "stop": ["a"] * 17}, "stop"),
    ({"prompt": "x", "job_id": "../../etc"}, "job_id"),
    ({"prompt": "x", "surprise": True}, "surprise"),
    ({"prompt": "x" * 40000}, "prompt"),
])
def test_bad_bodies_get_400_naming_the_field(worker: Worker, body: dict, field: str) -> None:
    r = httpx.post(f"{worker.url}/execute", json=body, headers=worker.auth)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "INVALID_REQUEST" and err["details"]["field"] == field


def test_not_json_and_oversize_bodies(worker: Worker) -> None:
    r = httpx.post(f"{worker.url}/execute", content=b"{nope", headers=worker.auth)
    assert r.status_code == 400 and r.json()["error"]["details"]["field"] == "body"
    big = httpx.post(f"{worker.url}/execute", json={"prompt": "x" * (2 * 1024 * 1024)},
                     headers=worker.auth)
    assert big.status_code == 413 and big.json()["error"]["code"] == "INVALID_REQUEST"


def test_second_job_gets_503_then_cancel_frees_the_slot(worker: Worker) -> None:
    with httpx.stream("POST", f"{worker.url}/execute", headers=worker.auth, timeout=30,
                      json={"prompt": "Hello", "max_tokens": 8000, "job_id": "long"}) as r:
        events = sse_events(r.iter_lines())
        assert next(events)[0] == "started"
        assert next(events)[0] == "token"
        busy = httpx.post(f"{worker.url}/execute", json={"prompt": "x"}, headers=worker.auth)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "ALL_SLOTS_BUSY"
        assert httpx.get(f"{worker.url}/health").json()["status"] == "busy"
        for _ in range(2):  # idempotent
            c = httpx.post(f"{worker.url}/cancel", json={"job_id": "long"}, headers=worker.auth)
            assert c.status_code == 202
        rest = list(events)
    assert rest[-1][0] == "end" and rest[-1][1]["stop_reason"] == "CANCELLED"
    wait_idle(worker)
    assert execute(worker, prompt="Hello", max_tokens=2)[-1][1]["tokens_out"] == 2


def test_client_disconnect_cancels_the_job(worker: Worker) -> None:
    before = httpx.get(f"{worker.url}/metrics", headers=worker.auth).text
    with httpx.stream("POST", f"{worker.url}/execute", headers=worker.auth, timeout=30,
                      json={"prompt": "Hello", "max_tokens": 30000}) as r:
        events = sse_events(r.iter_lines())
        next(events)
        next(events)
    # the stream was closed after one token: the worker must stop long before 30000 tokens
    wait_idle(worker)
    after = httpx.get(f"{worker.url}/metrics", headers=worker.auth).text
    assert _metric(after, 'outcome="cancelled"', "execute") == \
        _metric(before, 'outcome="cancelled"', "execute") + 1


def _metric(text: str, label: str, route: str) -> int:
    for line in text.splitlines():
        if line.startswith("rbee_worker_requests_total") and label in line and route in line:
            return int(line.rsplit(" ", 1)[1])
    return 0


def test_metrics_are_prometheus_text(worker: Worker) -> None:
    execute(worker, prompt="Hello", max_tokens=3)
    r = httpx.get(f"{worker.url}/metrics", headers=worker.auth)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in ("rbee_worker_requests_total", "rbee_worker_tokens_generated_total",
                 "rbee_worker_time_to_first_token_seconds_count", "rbee_worker_busy",
                 "rbee_worker_decode_tokens_per_second", "rbee_worker_uptime_seconds"):
        assert f"# TYPE {name.removesuffix('_count')}" in r.text and name in r.text
    assert _metric(r.text, 'outcome="completed"', "execute") >= 1


def test_openai_client_talks_to_the_worker(worker: Worker) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{worker.url}/v1", api_key=worker.token)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    done = client.completions.create(model="tiny", prompt="Hello", max_tokens=5)
    assert done.choices[0].text == "pqrst" and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 5
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Hello", max_tokens=5, stream=True))
    assert streamed == "pqrst"
    chat = client.chat.completions.create(model="tiny", max_tokens=4,
                                          messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == "abcd"  # the prompt ends "Assistant:"
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", max_tokens=4, stream=True, messages=[{"role": "user", "content": "hi"}])]
    assert "".join(parts) == "abcd"
    cut = client.chat.completions.create(model="tiny", max_tokens=40, stop=["cd"],
                                         messages=[{"role": "user", "content": "ok"}])
    assert cut.choices[0].message.content == "ab" and cut.choices[0].finish_reason == "stop"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{worker.url}/v1", api_key="nope-nope").models.list()


def test_chat_uses_the_models_own_template(tiny_model: Path, tmp_path: Path) -> None:
    from tests.tinymodel import write_tiny_model

    model = write_tiny_model(tmp_path / "chat.gguf", chat_template=(
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] Sure!{% endif %}"))
    w = start_worker(model, tmp_path / "w.log", ctx=512)
    try:
        r = httpx.post(f"{w.url}/v1/chat/completions", headers=w.auth, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10})
        assert r.status_code == 200
        # the template ends with "!", after which the tiny model says "KO" and stops
        assert r.json()["choices"][0]["message"]["content"] == "KO"
        assert r.json()["choices"][0]["finish_reason"] == "stop"
    finally:
        w.proc.terminate()
        w.proc.wait(timeout=10)


def test_shutdown_is_202_then_a_clean_exit(tiny_model: Path, tmp_path: Path) -> None:
    w = start_worker(tiny_model, tmp_path / "w.log", ctx=512)
    stream_done = threading.Event()

    def long_job() -> None:
        with contextlib.suppress(httpx.HTTPError, AssertionError):
            execute(w, prompt="Hello", max_tokens=100000)
        stream_done.set()

    t = threading.Thread(target=long_job)
    t.start()
    time.sleep(0.3)
    r = httpx.post(f"{w.url}/shutdown", headers=w.auth)
    assert r.status_code == 202
    assert w.proc.wait(timeout=15) == 0
    assert stream_done.wait(10)
    t.join()


def test_gpu_backend_without_gpu_build_refuses_to_start(tiny_model: Path, tmp_path: Path) -> None:
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python build can offload to a GPU")
    proc = subprocess.run(
        [str(BIN / "llm-worker-rbee"), "--model", str(tiny_model), "--backend", "cuda",
         "--port", str(free_port()), "--worker-id", "gpu-test"],
        env={"RBEE_WORKER_TOKEN": "t" * 32}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("RBEE_ERROR ") and '"BACKEND_UNAVAILABLE"' in last


def test_worker_refuses_to_serve_without_a_token(tiny_model: Path) -> None:
    proc = subprocess.run(
        [str(BIN / "llm-worker-rbee"), "--model", str(tiny_model), "--backend", "cpu",
         "--port", str(free_port()), "--worker-id", "no-token"],
        env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "no bearer token" in proc.stderr


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0"])
def test_quantised_models_generate(quant: str, tmp_path: Path) -> None:
    """Quantised weights take llama.cpp's CPU-specific kernels; on Intel AMX CPUs its AMX
    path segfaults (llama.cpp#20824) unless the worker keeps weights out of AMX buffers."""
    from tests.tinymodel import write_tiny_model

    model = write_tiny_model(tmp_path / f"tiny-{quant}.gguf", quant=quant)
    w = start_worker(model, tmp_path / "w.log", ctx=512)
    try:
        events = execute(w, prompt="Hello", max_tokens=6, temperature=0.0)
        assert "".join(d["t"] for e, d in events if e == "token") == "pqrstu"
        assert w.proc.poll() is None
    finally:
        w.proc.terminate()
        w.proc.wait(timeout=10)
