"""rbee-hive worker: spawn, list, health, logs, stop — real worker processes on the tiny model."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import Env
from tests.helpers import error_of, run, sse_events
from tests.oversize import cpu_memory_total, ctx_beyond


def spawn(*args: str, env: dict[str, str] | None = None) -> dict:
    r = run("rbee-hive", "worker", "spawn", "cpu", "--model", "tiny", *args, "--format", "json",
            env=env)
    assert r.returncode == 0, r
    return dict(r.json())


def token_of(wid: str) -> str:
    return str(run("rbee-hive", "worker", "token", wid, "--format", "json").json()["token"])


def test_spawn_stream_cancel_stop(tiny_registered: str, rbee_env: Env) -> None:
    rec = spawn("--ctx", "8192")
    assert rec["schema"] == "rbee.hive.worker/v1"
    assert set(rec) >= {"id", "pid", "port", "url", "backend", "device", "model", "state"}
    assert rec["state"] == "ready" and rec["model"] == "tiny" and 8001 <= rec["port"] <= 8999

    listed = run("rbee-hive", "worker", "list", "--format", "json").json()
    assert [(w["id"], w["state"]) for w in listed["workers"]] == [(rec["id"], "ready")]

    health = run("rbee-hive", "worker", "health", rec["id"], "--format", "json").json()
    assert (health["status"], health["worker_id"], health["ctx"]) == ("ready", rec["id"], 8192)

    headers = {"Authorization": f"Bearer {token_of(rec['id'])}"}
    body = {"prompt": "Hello", "max_tokens": 5000, "job_id": "job-1"}
    tokens = []
    with httpx.stream("POST", f"{rec['url']}/execute", json=body, headers=headers,
                      timeout=30) as resp:
        assert resp.status_code == 200
        for event, data in sse_events(resp.iter_lines()):
            if event == "token":
                tokens.append(data["t"])
                if len(tokens) == 3:
                    c = httpx.post(f"{rec['url']}/cancel", json={"job_id": "job-1"},
                                   headers=headers)
                    assert c.status_code == 202 and c.json()["cancelling"] is True
            elif event == "end":
                end = data
                break
    assert end["stop_reason"] == "CANCELLED" and end["tokens_out"] < 5000
    assert "".join(tokens).startswith("pqr")

    logs = run("rbee-hive", "worker", "logs", rec["id"])
    assert logs.returncode == 0 and "ready on" in logs.stdout

    stopped = run("rbee-hive", "worker", "stop", rec["id"], "--format", "json")
    assert stopped.returncode == 0, stopped
    assert stopped.json()["signal"] == "SIGTERM"
    assert not _alive(rec["pid"])
    assert run("rbee-hive", "worker", "list", "--format", "json").json()["workers"] == []
    assert not list((rbee_env.rbee_home / "workers").glob(f"{rec['id']}.*"))


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_token_is_in_the_environment_never_in_argv(tiny_registered: str) -> None:
    rec = spawn()
    token = token_of(rec["id"])
    cmdline = Path(f"/proc/{rec['pid']}/cmdline").read_bytes().decode()
    assert token not in cmdline and rec["id"] in cmdline
    assert f"RBEE_WORKER_TOKEN={token}".encode() in Path(f"/proc/{rec['pid']}/environ").read_bytes()
    assert token not in Path(rec["log"]).read_text()
    token_file = Path(rec["log"]).with_suffix(".token")
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"


def test_a_killed_worker_is_reported_dead_with_its_log(tiny_registered: str) -> None:
    rec = spawn()
    os.kill(rec["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(rec["pid"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = run("rbee-hive", "worker", "list", "--format", "json")
    assert r.returncode == 0
    (w,) = r.json()["workers"]
    assert w["state"] == "dead" and "gone" in w["message"]
    assert any("ready on" in line for line in w["log_tail"])
    text = run("rbee-hive", "worker", "list")
    assert "dead" in text.stdout and "ready on" in text.stdout
    health = run("rbee-hive", "worker", "health", rec["id"], "--format", "json")
    assert health.returncode == 1 and error_of(health)["code"] == "WORKER_CRASHED"
    assert run("rbee-hive", "worker", "stop", rec["id"]).returncode == 0


def test_ten_concurrent_spawns_get_ten_ports_and_records(tiny_registered: str) -> None:
    with ThreadPoolExecutor(max_workers=10) as pool:
        records = list(pool.map(lambda _: spawn("--ctx", "512", "--threads", "1"), range(10)))
    assert len({r["port"] for r in records}) == 10
    assert len({r["id"] for r in records}) == 10
    listed = run("rbee-hive", "worker", "list", "--format", "json").json()["workers"]
    assert sorted((w["id"], w["port"], w["state"]) for w in listed) == sorted(
        (r["id"], r["port"], "ready") for r in records)
    stopped = run("rbee-hive", "worker", "stop", "--all", "--format", "json").json()
    assert len(stopped["stopped"]) == 10
    assert run("rbee-hive", "worker", "list", "--format", "json").json()["workers"] == []


def test_insufficient_ram_gives_figures_and_suggestions(tiny_registered: str,
                                                       rbee_env: Env) -> None:
    ctx = ctx_beyond(tiny_registered, cpu_memory_total())  # 300000000 fits a 125 GiB host
    r = run("rbee-hive", "worker", "spawn", "cpu", "--model", "tiny", "--ctx", str(ctx),
            "--format", "json")
    assert r.returncode == 1
    err = error_of(r)
    assert err["code"] == "INSUFFICIENT_RAM"
    assert err["details"]["required_bytes"] > err["details"]["available_bytes"]
    assert "--ctx 32768" in err["details"]["suggestions"]
    assert "KV cache" in err["message"] and "--ctx 32768" in err["hint"]
    assert not list((rbee_env.rbee_home / "workers").glob("*.json"))


def test_unavailable_backend_is_refused(tiny_registered: str) -> None:
    from rbee_hive.devices import detect

    if next(b for b in detect()["backends"] if b["name"] == "cuda")["available"]:
        pytest.skip("this machine has a working CUDA backend")
    r = run("rbee-hive", "worker", "spawn", "cuda", "--model", "tiny", "--format", "json")
    assert r.returncode == 1 and error_of(r)["code"] == "BACKEND_UNAVAILABLE"


def test_unknown_model_says_how_to_get_it(rbee_env: Env) -> None:
    r = run("rbee-hive", "worker", "spawn", "cpu", "--model", "gemma3-270m")
    assert r.returncode == 1
    assert "MODEL_NOT_FOUND" in r.stderr and "rbee-hive models download gemma3-270m" in r.stderr


def test_loading_timeout_stops_the_worker_and_shows_the_log(tiny_registered: str) -> None:
    r = run("rbee-hive", "worker", "spawn", "cpu", "--model", "tiny", "--timeout", "0.05",
            "--format", "json")
    assert r.returncode == 1
    err = error_of(r)
    assert err["code"] == "LOADING_TIMEOUT" and isinstance(err["details"]["log_tail"], list)
    (w,) = run("rbee-hive", "worker", "list", "--format", "json").json()["workers"]
    assert w["state"] == "error" and not _alive(w["pid"])


def test_a_model_llama_cpp_cannot_load_is_model_load_failed(rbee_env: Env) -> None:
    import gguf

    path = rbee_env.root / "headless.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(128)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert run("rbee-hive", "models", "import", str(path), "--id", "headless").returncode == 0
    r = run("rbee-hive", "worker", "spawn", "cpu", "--model", "headless", "--format", "json")
    assert r.returncode == 1
    err = error_of(r)
    assert err["code"] == "MODEL_LOAD_FAILED"
    assert any("RBEE_ERROR" in line for line in err["details"]["log_tail"])
    (w_,) = run("rbee-hive", "worker", "list", "--format", "json").json()["workers"]
    assert w_["state"] == "error"


def test_no_wait_returns_while_loading_and_logs_follow(tiny_registered: str) -> None:
    from tests.helpers import popen

    rec = spawn("--no-wait")
    assert rec["state"] == "loading"
    follower = popen("rbee-hive", "worker", "logs", rec["id"], "--follow")
    deadline = time.monotonic() + 30
    while True:
        h = run("rbee-hive", "worker", "health", rec["id"], "--format", "json")
        if h.returncode == 0 and h.json()["status"] == "ready":
            break
        assert time.monotonic() < deadline, h
        time.sleep(0.1)
    assert run("rbee-hive", "worker", "stop", rec["id"]).returncode == 0
    out, _ = follower.communicate(timeout=15)  # --follow ends when the worker exits
    assert follower.returncode == 0
    assert "loading" in out and "ready on" in out


def test_status_is_one_document_with_everything(tiny_registered: str) -> None:
    rec = spawn()
    r = run("rbee-hive", "status", "--format", "json")
    assert r.returncode == 0
    doc = r.json()
    assert doc["schema"] == "rbee.hive.status/v1"
    assert set(doc) == {"schema", "host", "reserve_bytes", "backends", "devices", "models",
                        "workers", "lenders"}
    assert doc["lenders"] == []  # RPC lenders (tests/test_rpc.py)
    assert {b["name"] for b in doc["backends"]} == {"cpu", "cuda", "metal"}
    cpu = next(d for d in doc["devices"] if d["backend"] == "cpu")
    assert cpu["memory_total"] > cpu["memory_free"] > 0 and cpu["cores"] >= 1
    assert [m["id"] for m in doc["models"]] == ["tiny"]
    assert [(w["id"], w["state"]) for w in doc["workers"]] == [(rec["id"], "ready")]
    detect = run("rbee-hive", "detect", "--format", "json").json()
    assert detect["schema"] == "rbee.hive.detect/v1" and detect["devices"][0]["backend"] == "cpu"


def test_status_does_not_import_heavy_libraries(tiny_registered: str) -> None:
    import subprocess
    import sys

    code = ("import sys; from rbee_hive.status import status; status(); "
            "print([m for m in ('llama_cpp', 'fastapi', 'starlette', 'paramiko', 'httpx', "
            "'huggingface_hub', 'pydantic', 'gguf', 'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.replace("'", '"')) == []


def test_waiting_for_vram_release_returns_at_once_for_a_process_without_any() -> None:
    from rbee_hive.process import wait_vram_released

    # without NVML (or for a process that holds no VRAM) stopping must not pay the timeout
    started = time.monotonic()
    assert wait_vram_released(os.getpid(), [0], timeout=5.0) is True
    assert time.monotonic() - started < 1.0
