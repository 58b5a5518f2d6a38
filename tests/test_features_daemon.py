"""Step definitions for tests/features/daemon.feature; the common steps (a pool over SSH, the
catalog on the hub, running a command, its outcome) are those of tests/test_features.py."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from pytest_bdd import given, parsers, scenarios, then, when

import tests.test_features as common
from tests.conftest import SshHost, SshPool
from tests.helpers import run
from tests.sshd import free_port
from tests.test_features import World

# reuse every step of test_features.py, and its `world`: pytest-bdd keeps each step as a
# fixture of the module that defines it, so they are brought here as fixtures of this one
globals().update({name: value for name, value in vars(common).items()
                  if name.startswith("pytestbdd_stepdef_") or name == "world"})

scenarios("daemon.feature")


def host(ssh_pool: SshPool, name: str) -> SshHost:
    return next(h for h in ssh_pool.hosts if h.name == name)


@pytest.fixture
def killed() -> dict[str, Any]:
    """The worker a scenario killed: its id and when."""
    return {}


@pytest.fixture
def daemons(ssh_pool: SshPool) -> Any:
    """Pool daemons the scenario started, stopped after it (before their hosts go)."""
    started: list[SshHost] = []
    yield started
    for h in started:
        run("rbee-hive", "daemon", "stop", env={"RBEE_HOME": str(h.rbee_home)})


@given(parsers.parse('I started a pool daemon on "{name}" from the controller'))
def daemon_started(ssh_pool: SshPool, daemons: list[SshHost], name: str) -> None:
    h = host(ssh_pool, name)
    r = run("rbee", "pool", "daemon", "start", "--host", name, "--port",
            str(free_port(h.sshd.address)), "--format", "json")
    assert r.returncode == 0, r
    assert r.json()["reachable"] is True
    daemons.append(h)


@when("every host's SSH server is started again")
def sshd_again(ssh_pool: SshPool) -> None:
    for h in ssh_pool.hosts:
        h.sshd.start(ssh_pool.lab.authorized)


@when(parsers.parse('the pool daemon on "{name}" is stopped on the host itself'))
def daemon_stopped_there(ssh_pool: SshPool, name: str) -> None:
    r = run("rbee-hive", "daemon", "stop", env={"RBEE_HOME": str(host(ssh_pool, name).rbee_home)})
    assert r.returncode == 0, r


def _record(h: SshHost, wid: str) -> dict[str, Any]:
    return dict(json.loads((h.rbee_home / "workers" / f"{wid}.json").read_text()))


def _parent(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("PPid")))


@then(parsers.parse('the pool daemon on "{name}" started the worker'))
def daemon_started_worker(ssh_pool: SshPool, world: World, name: str) -> None:
    h = host(ssh_pool, name)
    state = json.loads((h.rbee_home / "pool-daemon.json").read_text())
    record = _record(h, world.doc()["worker"]["id"])
    assert _parent(record["pid"]) == state["pid"]


@then(parsers.parse('"{name}" reports the worker that answered'))
def reports_worker(world: World, name: str) -> None:
    doc = world.doc()
    (h,) = [h for h in doc["hosts"] if h["name"] == name]
    assert [w["state"] for w in h["status"]["workers"]] == ["ready"]


@when(parsers.parse('the worker serving "{model}" dies'))
def worker_dies(killed: dict[str, Any], model: str) -> None:
    (w,) = [w for w in run("rbee", "workers", "list", "--format", "json").json()["workers"]
            if w["model"] == model]
    os.kill(w["pid"], signal.SIGKILL)
    killed.update(id=w["id"], at=time.monotonic())


@then(parsers.parse('within {seconds:d} seconds its record on "{name}" says it is dead'))
def dead_in_time(ssh_pool: SshPool, killed: dict[str, Any], seconds: int, name: str) -> None:
    h = host(ssh_pool, name)
    # nobody asks the host meanwhile: only its daemon's watching can change the record
    while _record(h, killed["id"])["state"] != "dead":
        assert time.monotonic() < killed["at"] + seconds, _record(h, killed["id"])
        time.sleep(0.05)


@then("rbee workers list shows it dead with the reason")
def listed_dead(killed: dict[str, Any]) -> None:
    listed = run("rbee", "workers", "list", "--format", "json").json()["workers"]
    (w,) = [w for w in listed if w["id"] == killed["id"]]
    assert w["state"] == "dead" and w["message"]
