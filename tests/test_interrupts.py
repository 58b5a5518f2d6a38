"""Ctrl+C at any point of a command: exit 130 with a CANCELLED error a user (or `jq`) can
read, never a silent exit or a traceback, and nothing lost that a rerun needs."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import Env, SshPool
from tests.helpers import Result, error_of, popen, run
from tests.hubserver import HubServer


def _big_gguf(env: Env, size: int) -> bytes:
    """A valid GGUF header padded to `size` bytes (llama.cpp is not asked to load it)."""
    from tests.tinymodel import write_tiny_model

    head = write_tiny_model(env.root / "pad.gguf").read_bytes()
    return head + os.urandom(size - len(head))


def _interrupt_when(proc: subprocess.Popen[str], part: Path, at_least: int) -> Result:
    """Press Ctrl+C (SIGINT to the command alone) once `part` holds `at_least` bytes."""
    deadline = time.monotonic() + 30
    while not (part.exists() and part.stat().st_size >= at_least):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    return Result([], proc.returncode, out, err)


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_ctrl_c_while_infer_downloads_says_cancelled_and_the_rerun_resumes(
        hub: HubServer, rbee_env: Env, fmt: str) -> None:
    body = _big_gguf(rbee_env, 3_000_000)
    hub.add_file("big.gguf", body)
    hub.state.bytes_per_sec = 500_000
    url = f"{hub.url}/files/big.gguf"
    infer = popen("rbee", "infer", "-m", url, "-p", "Hello", "--format", fmt)
    r = _interrupt_when(infer, rbee_env.rbee_home / "downloads" / "big.part", 300_000)
    assert r.returncode == 130, r
    assert "Traceback" not in r.stderr, r
    if fmt == "json":
        err = error_of(r)  # one document on stdout, as every --format json failure prints
        assert err["code"] == "CANCELLED", r
        assert "resume" in err["hint"], r
    else:
        assert r.stdout == "", r
        assert "(CANCELLED)" in r.stderr and "resume" in r.stderr, r
    kept = (rbee_env.rbee_home / "downloads" / "big.part").stat().st_size
    assert 0 < kept < len(body)
    hub.state.bytes_per_sec = None
    done = run("rbee-hive", "models", "download", url, "--format", "json")
    assert done.returncode == 0, done
    assert done.json()["resumed_from"] > 0
    assert done.json()["sha256"] == hashlib.sha256(body).hexdigest()


def test_ctrl_c_while_infer_streams_keeps_the_partial_text_in_json(tiny_registered: str) -> None:
    spawned = run("rbee-hive", "worker", "spawn", "cpu", "--model", tiny_registered,
                  "--format", "json")
    assert spawned.returncode == 0, spawned
    worker = spawned.json()["id"]
    infer = popen("rbee", "infer", "-m", tiny_registered, "-p", "Hello", "--max-tokens", "30000",
                  "--format", "json")
    deadline = time.monotonic() + 20
    while run("rbee-hive", "worker", "health", worker, "--format", "json").json().get(
            "status") != "busy":
        assert time.monotonic() < deadline and infer.poll() is None, infer.communicate()
        time.sleep(0.1)
    time.sleep(0.3)
    infer.send_signal(signal.SIGINT)
    out, err = infer.communicate(timeout=30)
    r = Result([], infer.returncode, out, err)
    assert r.returncode == 130, r
    doc = error_of(r)
    assert doc["code"] == "CANCELLED", r
    # what the worker generated before Ctrl+C is kept, as a crash keeps it
    text = doc["details"]["text"]
    assert doc["details"]["tokens"] > 0 and text and "pqrstuvwxyz".startswith(text[:11]), r
    health = run("rbee-hive", "worker", "health", worker, "--format", "json").json()
    deadline = time.monotonic() + 10
    while health.get("status") != "ready":  # the job was cancelled on the worker too
        assert time.monotonic() < deadline, health
        time.sleep(0.1)
        health = run("rbee-hive", "worker", "health", worker, "--format", "json").json()


def _loading_record(rbee_home: Path, proc: subprocess.Popen[str]) -> dict:
    """The record of the worker `proc` is starting, once its process exists."""
    import json

    deadline = time.monotonic() + 20
    while True:
        for path in (rbee_home / "workers").glob("*.json"):
            record = json.loads(path.read_text())
            if record.get("pid"):
                return record
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.02)


def test_ctrl_c_while_a_worker_loads_stops_it(rbee_env: Env, tiny_registered: str) -> None:
    spawn = popen("rbee-hive", "worker", "spawn", "cpu", "--model", tiny_registered,
                  "--format", "json")
    _interrupt_while_loading(rbee_env, spawn, timeout=30)


def _interrupt_while_loading(env: Env, proc: subprocess.Popen[str], timeout: float) -> None:
    """Ctrl+C once `proc`'s worker is starting: CANCELLED naming it, and no worker left."""
    record = _loading_record(env.rbee_home, proc)
    proc.send_signal(signal.SIGINT)  # while the worker starts: it must not run on unasked
    out, err = proc.communicate(timeout=timeout)
    r = Result([], proc.returncode, out, err)
    assert r.returncode == 130, r
    doc = error_of(r)
    assert doc["code"] == "CANCELLED" and doc["details"]["worker_id"] == record["id"], r
    assert _gone(record["pid"]), "the worker runs on, unasked for"
    listed = run("rbee-hive", "worker", "list", "--format", "json")
    assert listed.json()["workers"] == [], listed


def _gone(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().split()[2] == "Z"


def test_ctrl_c_while_infer_starts_a_worker_stops_it(rbee_env: Env, tiny_registered: str) -> None:
    infer = popen("rbee", "infer", "-m", tiny_registered, "-p", "Hello", "--format", "json")
    _interrupt_while_loading(rbee_env, infer, timeout=60)


@pytest.mark.ssh
def test_ctrl_c_while_infer_starts_a_worker_over_ssh_stops_it(ssh_pool: SshPool,
                                                              tiny_model: Path) -> None:
    (h1,) = ssh_pool.start(1)
    imported = run("rbee", "pool", "models", "import", str(tiny_model), "--id", "tiny",
                   "--host", "h1", "--format", "json")
    assert imported.returncode == 0, imported
    infer = popen("rbee", "infer", "-m", "tiny", "-p", "Hello", "--host", "h1",
                  "--format", "json")
    record = _loading_record(h1.rbee_home, infer)
    infer.send_signal(signal.SIGINT)
    out, err = infer.communicate(timeout=60)
    assert infer.returncode == 130, (out, err)
    assert error_of(Result([], 130, out, err))["code"] == "CANCELLED"
    deadline = time.monotonic() + 20  # the host sees its stdin close, then stops the worker
    while not _gone(record["pid"]):
        assert time.monotonic() < deadline, "the worker runs on, unasked for"
        time.sleep(0.1)
    listed = run("rbee", "workers", "list", "--format", "json")
    assert listed.json()["workers"] == [], listed


def test_a_second_ctrl_c_while_the_first_is_reported_prints_no_traceback(
        hub: HubServer, rbee_env: Env) -> None:
    body = _big_gguf(rbee_env, 3_000_000)
    hub.add_file("big.gguf", body)
    hub.state.bytes_per_sec = 500_000
    proc = popen("rbee-hive", "models", "download", f"{hub.url}/files/big.gguf")
    part = rbee_env.rbee_home / "downloads" / "big.part"
    deadline = time.monotonic() + 30
    while not (part.exists() and part.stat().st_size > 200_000):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # an impatient user presses Ctrl+C twice
    time.sleep(0.03)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "(CANCELLED)" in err, err



def test_a_local_hive_ends_when_its_controller_is_killed(rbee_env: Env,
                                                         tiny_registered: str) -> None:
    """The local hive runs in a process group of its own (so a Ctrl+C reaches it once, from
    rbee): a controller killed outright must still not leave it running unattended (here
    following an idle worker's log, which writes nothing that would fail on the closed
    pipe). Its stdin closes, and it ends as a Ctrl+C would."""
    worker = run("rbee-hive", "worker", "spawn", "cpu", "--model", tiny_registered,
                 "--threads", "1", "--format", "json")
    assert worker.returncode == 0, worker
    follow = popen("rbee", "pool", "worker", "logs", worker.json()["id"], "--follow",
                   "--host", "localhost")
    deadline = time.monotonic() + 30
    hives: list[int] = []
    while not hives:
        assert time.monotonic() < deadline and follow.poll() is None, follow.communicate()
        time.sleep(0.1)
        children = Path(f"/proc/{follow.pid}/task/{follow.pid}/children").read_text().split()
        hives = [int(c) for c in children
                 if b"rbee-hive" in Path(f"/proc/{c}/cmdline").read_bytes()]
    time.sleep(1.0)  # following by now
    follow.kill()
    follow.communicate(timeout=10)
    deadline = time.monotonic() + 10
    while any(_state(h) not in ("gone", "Z") for h in hives):
        assert time.monotonic() < deadline, "the hive kept running after rbee was killed"
        time.sleep(0.1)

def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _spawn_by_stdin(model: str, ack: bool) -> tuple[dict, subprocess.Popen[str]]:
    """`rbee-hive --stdin-json` driven as rbee drives it: the command and settings on stdin,
    the answer read off stdout; then stdin closes, with or without the acknowledgement."""
    import json

    from tests.helpers import BIN

    proc = subprocess.Popen([str(BIN / "rbee-hive"), "--stdin-json"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps({"env": {}, "watch_stdin": True, "acks": True, "argv": [
        "worker", "spawn", "cpu", "--model", model, "--threads", "1", "--format",
        "ndjson"]}) + "\n")
    proc.stdin.flush()
    result = None
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "result":
            result = event["result"]
            break
    assert result is not None and result["state"] == "ready", proc.communicate()
    if ack:
        proc.stdin.write("ack\n")
        proc.stdin.flush()
    proc.stdin.close()
    proc.wait(timeout=30)
    return result, proc


def test_a_worker_whose_answer_is_never_acknowledged_is_stopped(rbee_env: Env,
                                                                tiny_registered: str) -> None:
    """A Ctrl+C just after the worker got ready, before rbee read the answer, left a worker
    running that no one knew of: the hive now waits for rbee's acknowledgement, and stops
    the worker when its stdin closes without one."""
    lost, _ = _spawn_by_stdin(tiny_registered, ack=False)
    assert _gone(lost["pid"])
    kept, _ = _spawn_by_stdin(tiny_registered, ack=True)
    assert not _gone(kept["pid"])
    listed = run("rbee-hive", "worker", "list", "--format", "json").json()["workers"]
    live = [w["id"] for w in listed if w["state"] in ("ready", "busy", "loading")]
    assert live == [kept["id"]], listed
