"""GPU checks: run only where NVML sees a device and llama-cpp-python was built for CUDA
(CMAKE_ARGS="-DGGML_CUDA=on"). Everywhere else they are skipped, with the reason."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Env
from tests.helpers import error_of, run, sse_events
from tests.oversize import ctx_beyond

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda(rbee_env: Env) -> dict:
    from rbee_hive.devices import detect

    inventory = detect()
    cuda_backend = next(b for b in inventory["backends"] if b["name"] == "cuda")
    if not cuda_backend["available"]:
        pytest.skip(f"no CUDA here: {cuda_backend['reason']}")
    return next(d for d in inventory["devices"] if d["backend"] == "cuda")


def test_cuda_worker_runs_entirely_in_vram(cuda: dict, tiny_registered: str) -> None:
    r = run("rbee-hive", "worker", "spawn", "cuda", "--model", "tiny", "--format", "json")
    assert r.returncode == 0, r
    rec = r.json()
    log = run("rbee-hive", "worker", "logs", rec["id"], "--lines", "400").stdout
    token = run("rbee-hive", "worker", "token", rec["id"]).stdout.strip()
    health = httpx.get(f"{rec['url']}/health").json()
    assert health["backend"] == "cuda" and health["vram_bytes"] > 0
    with httpx.stream("POST", f"{rec['url']}/execute", headers={
            "Authorization": f"Bearer {token}"},
            json={"prompt": "Hello", "max_tokens": 12, "temperature": 0}) as resp:
        text = "".join(d["t"] for e, d in sse_events(resp.iter_lines()) if e == "token")
    assert text == "pqrstuvwxyz "
    assert "RBEE_ERROR" not in log


def test_cuda_insufficient_vram_names_figures(cuda: dict, tiny_registered: str) -> None:
    # Held against the card's total, which no other worker changes: its free memory, read
    # while an earlier test's worker was still letting go of ~770 MB, raced the spawn's.
    ctx = ctx_beyond(tiny_registered, cuda["memory_total"])
    r = run("rbee-hive", "worker", "spawn", "cuda", "--model", "tiny", "--ctx", str(ctx),
            "--format", "json")
    assert r.returncode == 1, r
    err = error_of(r)
    assert err["code"] == "INSUFFICIENT_VRAM"
    d = err["details"]
    assert d["available_bytes"] < cuda["memory_total"] < d["required_bytes"]
    assert f"at ctx {ctx} needs" in err["message"] and "VRAM" in err["message"]


def test_cuda_placement_prefers_the_gpu(cuda: dict, tiny_registered: str) -> None:
    r = run("rbee", "infer", "--model", "tiny", "--prompt", "Hello", "--max-tokens", "4",
            "--format", "json")
    assert r.returncode == 0, r
    assert r.json()["worker"]["backend"] == "cuda"


def test_cuda_worker_stop_returns_once_its_vram_is_released(cuda: dict,
                                                           tiny_registered: str) -> None:
    from worker.engine import cuda_memory_of

    r = run("rbee-hive", "worker", "spawn", "cuda", "--model", "tiny", "--format", "json")
    assert r.returncode == 0, r
    rec = r.json()
    assert cuda_memory_of(rec["pid"], [rec["device"]]) > 0
    assert run("rbee-hive", "worker", "stop", rec["id"]).returncode == 0
    # no pause here: `stop` itself waits for the driver to free the worker's memory
    assert cuda_memory_of(rec["pid"], [rec["device"]]) == 0
