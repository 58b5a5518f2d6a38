"""Faults between the controller and its hosts, injected for real and bounded in time: a
host that accepts TCP but never speaks SSH, a connection that drops mid-command, a
controller that gives up (Ctrl+C) while a remote command runs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Env, SshPool
from tests.helpers import Result, error_of, popen, run

pytestmark = pytest.mark.ssh


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP server that accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield int(server.getsockname()[1])
    stop.set()
    t.join()
    for c in held:
        c.close()
    server.close()


def test_a_host_that_never_speaks_ssh_is_unreachable_without_a_traceback(
        ssh_pool: SshPool, rbee_env: Env, silent_port: int) -> None:
    ssh_pool.start(1)
    with open(rbee_env.config / "hosts.toml", "a") as f:
        f.write(f'\n[hosts.mute]\nssh = "me@127.0.0.1:{silent_port}"\nconnect_timeout = 1\n')
    t0 = time.monotonic()
    r = run("rbee", "pool", "status", "--format", "json")
    assert time.monotonic() - t0 < 15
    assert r.returncode == 3, r  # the other host answered
    by = {h["name"]: h for h in r.json()["hosts"]}
    assert by["h1"]["ok"] is True
    err = by["mute"]["error"]
    assert err["code"] == "HOST_UNREACHABLE" and "did not speak SSH" in err["message"]
    assert "Traceback" not in r.stderr and "paramiko" not in r.stderr, r.stderr
    text = run("rbee", "hosts", "check", "mute")
    assert "Traceback" not in text.stderr and "did not speak SSH" in text.stdout


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _spawned(host: str) -> dict:
    r = run("rbee", "pool", "worker", "spawn", "cpu", "--model", "tiny", "--threads", "1",
            "--host", host, "--format", "json")
    assert r.returncode == 0, r
    return dict(r.json())


def _remote_hives(pool: SshPool) -> list[int]:
    """rbee-hive processes the host's sshd runs (the commands `rbee` started there)."""
    listener = pool.hosts[0].sshd.proc
    assert listener is not None
    out = []
    for pid in _descendants(listener.pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a == b"rbee-hive" or a.endswith(b"/rbee-hive") for a in argv):
            out.append(pid)
    return out


@pytest.fixture
def remote_worker(ssh_pool: SshPool, tiny_model: Path) -> dict:
    ssh_pool.start(1)
    r = run("rbee", "pool", "models", "import", str(tiny_model), "--id", "tiny", "--host", "h1")
    assert r.returncode == 0, r
    return _spawned("h1")


def test_a_remote_command_given_up_on_does_not_run_on(remote_worker: dict,
                                                      ssh_pool: SshPool) -> None:
    """A long-lived controller (the queen) keeps its SSH connection: a command it stops
    waiting for must end on the host, not run on unseen."""
    import threading

    from rbee_keeper.errors import HostUnreachable
    from rbee_keeper.hive import SshHive
    from rbee_keeper.hosts import load_hosts

    hive = SshHive(load_hosts()["h1"])
    seen: set[int] = set()
    waiting = threading.Event()

    def look() -> None:
        while not waiting.is_set():
            seen.update(_remote_hives(ssh_pool))
            time.sleep(0.05)

    watcher = threading.Thread(target=look)
    watcher.start()
    try:
        with pytest.raises(HostUnreachable, match="no answer within 1s"):
            hive.transport.run(["worker", "logs", remote_worker["id"], "--follow",
                                "--format", "ndjson"], timeout=1.0)
        waiting.set()
        watcher.join()
        assert seen, "the follower never ran on the host"
        deadline = time.monotonic() + 10
        while _remote_hives(ssh_pool):
            assert time.monotonic() < deadline, "rbee-hive kept running on the host"
            time.sleep(0.1)
        assert hive.status()["schema"] == "rbee.hive.status/v1"  # the connection lives on
    finally:
        waiting.set()
        hive.close()


def test_a_connection_that_drops_mid_command_is_host_unreachable(
        remote_worker: dict, ssh_pool: SshPool) -> None:
    follow = popen("rbee", "pool", "worker", "logs", remote_worker["id"], "--follow",
                   "--host", "h1", "--format", "json")
    deadline = time.monotonic() + 20
    while not _remote_hives(ssh_pool):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    listener = ssh_pool.hosts[0].sshd.proc
    assert listener is not None
    sshds = [pid for pid in _descendants(listener.pid)
             if "sshd" in Path(f"/proc/{pid}/comm").read_text()]
    assert sshds
    for pid in sshds:  # every sshd process of the connection: the connection drops
        subprocess.run(["kill", "-KILL", str(pid)], check=False)
    out, err = follow.communicate(timeout=30)
    assert follow.returncode == 1, (out, err)
    last = out.strip().splitlines()[-1]
    doc = error_of(Result([], 1, last, err))
    assert doc["code"] == "HOST_UNREACHABLE", doc


def test_a_crash_keeps_the_partial_text_in_json_and_names_the_worker(
        remote_worker: dict) -> None:
    infer = popen("rbee", "infer", "-m", "tiny", "-p", "Hello", "--max-tokens", "30000",
                  "--host", "h1", "--format", "json")
    deadline = time.monotonic() + 20
    while True:
        health = run("rbee", "pool", "worker", "health", remote_worker["id"], "--host", "h1",
                     "--format", "json").json()
        if health.get("status") == "busy":
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1.0)  # tokens on their way (fewer on a loaded machine)
    os.kill(remote_worker["pid"], signal.SIGKILL)
    out, err = infer.communicate(timeout=30)
    assert infer.returncode == 1, (out, err)
    doc = error_of(Result([], 1, out, err))
    assert doc["code"] == "WORKER_CRASHED"
    text = doc["details"]["text"]
    assert text and "pqrstuvwxyz".startswith(text[:11]), doc
    assert f"worker logs {remote_worker['id']} --host h1" in doc["hint"]


def test_a_model_only_an_unreachable_host_has_names_that_host(remote_worker: dict,
                                                              ssh_pool: SshPool) -> None:
    run("rbee", "workers", "stop", "--all")
    ssh_pool.hosts[0].sshd.stop()
    r = run("rbee", "infer", "-m", "tiny", "-p", "Hello", "--format", "json")
    assert r.returncode == 1, r
    err = error_of(r)
    assert err["code"] == "MODEL_NOT_FOUND" and "h1 (HOST_UNREACHABLE)" in err["message"]
    assert err["details"]["unreachable"] == ["h1"]
