"""The keeper's core called in-process: hive clients over real transports, preflight, infer
documents. Each test here guards a bug found in review (they failed before their fix)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from rbee_keeper.errors import HostUnreachable
from rbee_keeper.hive import LocalHive, SshHive
from rbee_keeper.hosts import HostConfig, load_hosts
from tests.conftest import Env, SshPool
from tests.helpers import run


def _hanging_hive(tmp: Path) -> str:
    """A "hive" that never answers and keeps its stdout open (a stuck remote command)."""
    script = tmp / "stuck-hive.py"
    script.write_text("import time\ntime.sleep(60)\n")
    return f"{sys.executable} {script}"


def test_local_timeout_covers_the_whole_command(rbee_env: Env) -> None:
    host = HostConfig(name="stuck", transport="local", hive=_hanging_hive(rbee_env.root))
    hive = LocalHive(host)
    t0 = time.monotonic()
    with pytest.raises(HostUnreachable, match="no answer within 1s"):
        hive.status(timeout=1.0)
    assert time.monotonic() - t0 < 10  # not the 60 s the stuck command would take
    out = subprocess.run(["pgrep", "-f", "stuck-hive.py"], capture_output=True, text=True)
    assert str(rbee_env.root) not in out.stdout  # and it was stopped, not left behind


def test_local_host_check_does_not_claim_ssh_checks(rbee_env: Env) -> None:
    r = run("rbee", "hosts", "check", "--format", "json")
    assert r.returncode == 0, r
    (host,) = r.json()["hosts"]
    checks = {c["check"]: c for c in host["checks"]}
    assert host["name"] == "localhost" and host["ok"] is True
    for step in ("host_key", "auth"):
        assert checks[step]["ok"] is None and checks[step]["skipped"], checks[step]
    for step in ("reachable", "hive", "schema"):
        assert checks[step]["ok"] is True, checks[step]


@pytest.mark.ssh
def test_ssh_hive_reconnects_after_the_connection_drops(ssh_pool: SshPool) -> None:
    (h1,) = ssh_pool.start(1)
    host = load_hosts()["h1"]
    hive = SshHive(host)
    try:
        assert hive.status()["schema"] == "rbee.hive.status/v1"
        listener = h1.sshd.proc
        assert listener is not None
        # end the per-connection sshd processes: the TCP connection drops, the server stays
        subprocess.run(["pkill", "-TERM", "-P", str(listener.pid)], check=False)
        deadline = time.monotonic() + 5
        while hive.transport._conn.transport.is_active() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hive.status()["schema"] == "rbee.hive.status/v1"
    finally:
        hive.close()


@pytest.mark.ssh
def test_warm_and_cold_infer_documents_have_the_same_placement_shape(
        ssh_pool: SshPool, rbee_env: Env, tiny_model: Path) -> None:
    ssh_pool.start(1)
    r = run("rbee", "pool", "models", "import", str(tiny_model), "--id", "tiny", "--host", "h1",
            "--format", "json")
    assert r.returncode == 0, r
    args = ("infer", "-m", "tiny", "-p", "Hello", "--max-tokens", "4", "--temperature", "0",
            "--format", "json")
    cold = run("rbee", *args)
    warm = run("rbee", *args)
    assert cold.returncode == 0 and warm.returncode == 0, (cold, warm)
    cp, wp = cold.json()["placement"], warm.json()["placement"]
    assert (cp["path"], wp["path"]) == ("cold", "warm")
    assert set(cp) == set(wp), (cp, wp)
    assert set(cp["chosen"]) == set(wp["chosen"])
    assert wp["chosen"]["worker"] == cold.json()["worker"]["id"]
    assert wp["ctx"] == cp["ctx"]


def test_an_id_that_reads_as_an_option_reaches_no_hive(rbee_env: Env,
                                                       tiny_registered: str) -> None:
    """A worker id "--all" (from the queen's POST /v2/workers/stop, say) stopped every worker
    of the host, jobs and all: ids go to the hive as positional words, never as options."""
    from rbee_common.errors import UsageError

    r = run("rbee-hive", "worker", "spawn", "cpu", "--model", tiny_registered, "--threads", "1",
            "--format", "json")
    assert r.returncode == 0, r
    hive = LocalHive(load_hosts()["localhost"])
    for call in (hive.stop, hive.token, hive.logs):
        with pytest.raises(UsageError, match="starts with '-'"):
            call("--all")
    with pytest.raises(UsageError):
        hive.download("--help")
    (worker,) = hive.workers()
    assert worker["id"] == r.json()["id"] and worker["state"] == "ready"
    hive.stop(worker["id"])
