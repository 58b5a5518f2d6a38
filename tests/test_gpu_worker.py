"""GPU checks of the worker itself, started as rbee-hive starts it (worker_argv, worker_env):
they run only where NVML sees CUDA devices and llama-cpp-python was built for CUDA, and are
skipped everywhere else, with the reason."""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers import sse_events
from tests.test_worker_api import free_port
from tests.tinymodel import write_tiny_model
from worker.engine import cuda_memory_of
from worker.launch import worker_argv, worker_env

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda_devices() -> list[int]:
    """The CUDA devices' indexes (NVML's, as rbee-hive numbers them)."""
    from rbee_hive.devices import detect

    inventory = detect()
    cuda = next(b for b in inventory["backends"] if b["name"] == "cuda")
    if not cuda["available"]:
        pytest.skip(f"no CUDA here: {cuda['reason']}")
    return [d["index"] for d in inventory["devices"] if d["backend"] == "cuda"]


@dataclass
class Worker:
    url: str
    token: str
    proc: subprocess.Popen[bytes]
    log: Path

    def execute(self, prompt: str, max_tokens: int) -> str:
        with httpx.stream("POST", f"{self.url}/execute", timeout=60,
                          headers={"Authorization": f"Bearer {self.token}"},
                          json={"prompt": prompt, "max_tokens": max_tokens,
                                "temperature": 0}) as r:
            assert r.status_code == 200, r.read()
            events = list(sse_events(r.iter_lines()))
        assert events[-1][0] == "end", events[-1]
        return "".join(d["t"] for e, d in events if e == "token")


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start_worker(model: Path, devices: list[int],
                     tensor_split: list[float] | None = None) -> Worker:
        token, port = secrets.token_urlsafe(24), free_port()
        argv = worker_argv(model_path=str(model), backend="cuda", device=devices, port=port,
                           host="127.0.0.1", worker_id="gpu-worker", ctx=512, model_id="tiny",
                           tensor_split=tensor_split)
        log = tmp_path / f"worker-{port}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen(argv, env=worker_env(token, "cuda", devices), stdout=f,
                                    stderr=subprocess.STDOUT)
        w = Worker(f"http://127.0.0.1:{port}", token, proc, log)
        started.append(w)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{w.url}/health").json()["status"] == "ready":
                    return w
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.1)

    yield start_worker
    for w in started:
        w.proc.terminate()
        w.proc.wait(timeout=15)


def test_deep_model_runs_entirely_in_vram(cuda_devices: list[int],
                                          start: Callable[..., Worker], tmp_path: Path) -> None:
    """24 layers: llama.cpp logs more graph lines after the offload line than the worker's
    log window held, which made every real model fail with MODEL_LOAD_FAILED."""
    device = cuda_devices[-1]
    w = start(write_tiny_model(tmp_path / "deep.gguf", n_layers=24), [device])
    health = httpx.get(f"{w.url}/health").json()
    assert health["device"] == device and health["devices"] == [device]
    assert health["vram_bytes"] > 0
    assert w.execute("Hello", 12) == "pqrstuvwxyz "
    assert "RBEE_ERROR" not in w.log.read_text()


def test_one_worker_split_across_two_gpus(cuda_devices: list[int],
                                          start: Callable[..., Worker], tmp_path: Path) -> None:
    if len(cuda_devices) < 2:
        pytest.skip(f"{len(cuda_devices)} CUDA device here; the split needs two")
    pair = cuda_devices[:2]
    w = start(write_tiny_model(tmp_path / "deep.gguf", n_layers=24), pair, [0.5, 0.5])
    health = httpx.get(f"{w.url}/health").json()
    assert health["device"] == pair[0] and health["devices"] == pair
    each = [cuda_memory_of(w.proc.pid, [d]) for d in pair]
    assert all(b > 0 for b in each), each  # both devices hold part of the model
    time.sleep(1.1)  # /health re-reads NVML at most once a second
    assert httpx.get(f"{w.url}/health").json()["vram_bytes"] >= sum(each) * 0.9
    assert w.execute("Hello", 12) == "pqrstuvwxyz "
