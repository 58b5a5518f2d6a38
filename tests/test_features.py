"""Step definitions for tests/features/*.feature: the real commands, on the real parts."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from pytest_bdd import given, parsers, scenarios, then, when

from tests.conftest import Env, SshPool
from tests.helpers import Result, popen, run
from tests.hubserver import HubServer
from tests.oversize import cpu_memory_total, ctx_beyond

scenarios("inference.feature", "models.feature", "config.feature")

REPO = "rbee-test/Tiny-GGUF"
SOURCE = f"hf:{REPO}/tiny.gguf"


class World:
    """What one scenario has done so far."""

    def __init__(self) -> None:
        self.env: dict[str, str] = {}
        self.result: Result | None = None
        self.proc: subprocess.Popen[str] | None = None
        self.partial = ""
        self.first_worker: str | None = None

    def doc(self) -> Any:
        assert self.result is not None
        return json.loads(self.result.stdout)

    def error(self) -> dict[str, Any]:
        doc = self.doc()
        if "error" in doc:
            return dict(doc["error"])
        return next(h["error"] for h in doc["hosts"] if not h["ok"])


@pytest.fixture
def world() -> World:
    return World()


def _workers() -> list[dict[str, Any]]:
    return list(run("rbee", "workers", "list", "--format", "json").json()["workers"])


# Given

@given(parsers.re(r"a pool of (?P<n>\d+) hosts? reached over SSH$"))
def pool(ssh_pool: SshPool, hub: HubServer, n: str) -> None:
    ssh_pool.start(int(n))


@given("a pool of 1 host reached over SSH whose host key I have never seen")
def pool_unknown_key(ssh_pool: SshPool) -> None:
    ssh_pool.start(1, known=False)


@given(parsers.parse('the controller\'s catalog names "{model}", served by the Hugging Face hub'))
def catalog_on_hub(rbee_env: Env, hub: HubServer, tiny_bytes: bytes, model: str) -> None:
    hub.add_repo_file(REPO, "tiny.gguf", tiny_bytes)
    (rbee_env.config / "catalog.toml").write_text(
        f'[[models]]\nid = "{model}"\nname = "Tiny"\nsource = "{SOURCE}"\n')


@given(parsers.parse('a prompt for "{model}" has already run'))
def warmed(world: World, model: str) -> None:
    r = run("rbee", "infer", "--model", model, "--prompt", "Hello", "--max-tokens", "1",
            "--ctx", "32768", "--format", "json")
    assert r.returncode == 0, r
    world.first_worker = r.json()["worker"]["id"]


@given("every host's SSH server is stopped")
def stop_all_sshd(ssh_pool: SshPool) -> None:
    for h in ssh_pool.hosts:
        h.sshd.stop()


@given(parsers.parse('the SSH server of "{name}" is stopped'))
def stop_sshd(ssh_pool: SshPool, name: str) -> None:
    next(h for h in ssh_pool.hosts if h.name == name).sshd.stop()


@given(parsers.parse("every host keeps {mib:d} MiB in reserve"))
def reserve(rbee_env: Env, mib: int) -> None:
    path = rbee_env.config / "hosts.toml"
    path.write_text(path.read_text().replace("env = { ", f'env = {{ RBEE_RESERVE_MIB = "{mib}", '))


@given(parsers.parse('the Hugging Face hub serves "{path}"'))
def hub_serves(hub: HubServer, tiny_bytes: bytes, path: str) -> None:
    org, repo, name = path.split("/", 2)
    hub.add_repo_file(f"{org}/{repo}", name, tiny_bytes)


@given(parsers.re(r'the Hugging Face hub serves the tiny model in 3 files in "(?P<repo>[^"]+)"'
                  r'(?P<but>, all but the second)?$'))
def hub_serves_split(hub: HubServer, split_files: list[Path], repo: str, but: str | None) -> None:
    for no, path in enumerate(split_files, 1):
        if not (but and no == 2):
            hub.add_repo_file(repo, path.name, path.read_bytes())


@given(parsers.parse("the hub will drop the connection after {n:d} bytes"))
def drop(hub: HubServer, n: int) -> None:
    hub.drop_next(after_bytes=n)


@given("dropped downloads are not retried")
def no_retries(world: World) -> None:
    world.env["RBEE_DOWNLOAD_RETRIES"] = "0"


@when("dropped downloads are retried again")
def retries_again(world: World) -> None:
    world.env.pop("RBEE_DOWNLOAD_RETRIES", None)


@given(parsers.parse('my catalog says "{model}" is "{source}" with sha256 "00…00"'))
def wrong_sha(rbee_env: Env, model: str, source: str) -> None:
    (rbee_env.config / "catalog.toml").write_text(
        f'[[models]]\nid = "{model}"\nname = "x"\nsource = "{source}"\nsha256 = "{"0" * 64}"\n')


@given(parsers.parse('"{model}" is on this host'))
def on_host(rbee_env: Env, tiny_model: Path, model: str) -> None:
    assert run("rbee-hive", "models", "import", str(tiny_model), "--id", model).returncode == 0


@given("hosts.toml contains:")
def hosts_toml(rbee_env: Env, docstring: str) -> None:
    (rbee_env.config / "hosts.toml").write_text(docstring + "\n")


@given("catalog.toml contains:")
def catalog_toml(rbee_env: Env, docstring: str) -> None:
    (rbee_env.config / "catalog.toml").write_text(docstring + "\n")


# When

@when(parsers.re(r"I run `(?P<command>.+)`$"))
def i_run(world: World, command: str) -> None:
    argv = shlex.split(command)
    world.result = run(argv[0], *argv[1:], env=world.env)


@when(parsers.parse('I spawn "{model}" on the CPU with a context whose KV cache alone exceeds '
                    "this machine's RAM"))
def spawn_beyond_ram(world: World, model: str) -> None:
    # derived from this machine's memory: a fixed --ctx (once 300000000, 72 GiB) fits on a
    # big enough host
    ctx = ctx_beyond(model, cpu_memory_total())
    world.result = run("rbee-hive", "worker", "spawn", "cpu", "--model", model, "--ctx",
                       str(ctx), "--format", "json", env=world.env)


@when(parsers.re(r"I start `(?P<command>.+)`$"))
def i_start(world: World, command: str) -> None:
    argv = shlex.split(command)
    world.proc = popen(argv[0], *argv[1:], env=world.env)


@when("the first tokens have arrived on stdout")
def first_tokens(world: World) -> None:
    assert world.proc is not None and world.proc.stdout is not None
    # 20 characters: everything a later step says about the partial answer has arrived
    world.partial = world.proc.stdout.read(20)
    assert world.partial == "pqrstuvwxyz abcdefgh"


def _finish(world: World) -> None:
    assert world.proc is not None
    out, err = world.proc.communicate(timeout=30)
    world.result = Result(["rbee", "infer"], world.proc.returncode, world.partial + out, err)


@when(parsers.parse('the worker serving "{model}" is killed'))
def kill_worker(world: World, model: str) -> None:
    (w,) = [w for w in _workers() if w["model"] == model]
    os.kill(w["pid"], signal.SIGKILL)
    _finish(world)


@when("I press Ctrl+C")
def ctrl_c(world: World) -> None:
    assert world.proc is not None
    world.proc.send_signal(signal.SIGINT)
    _finish(world)


# Then

@then("it succeeds")
def succeeds(world: World) -> None:
    assert world.result is not None and world.result.returncode == 0, world.result


@then(parsers.parse('it fails with exit code {code:d} and "{text}"'))
def fails(world: World, code: int, text: str) -> None:
    r = world.result
    assert r is not None and r.returncode == code, r
    assert text in r.stdout + r.stderr, r


@then(parsers.parse('the answer is "{text}"'))
def answer(world: World, text: str) -> None:
    assert world.doc()["text"] == text


@then("it took the cold path: status of every host, a download and a new worker")
def cold_path(world: World) -> None:
    doc = world.doc()
    assert doc["placement"]["path"] == "cold"
    assert {"status_ms", "download_ms", "spawn_ms"} <= set(doc["timings"])


@then("the placement names the host it chose and why the other was not chosen")
def placement_explained(world: World) -> None:
    p = world.doc()["placement"]
    assert p["chosen"]["host"] in ("h1", "h2") and p["chosen"]["reason"]
    (other,) = p["rejected"]
    assert other["host"] != p["chosen"]["host"] and other["reason"].startswith("ranked lower")


@then("it took the warm path, straight to the known worker")
def warm_path(world: World) -> None:
    doc = world.doc()
    assert doc["placement"]["path"] == "warm" and "status_ms" not in doc["timings"]


@then("stdout still holds the partial answer")
def partial(world: World) -> None:
    assert world.result is not None
    assert world.result.stdout.startswith("pqrstuvwxyz abc")
    assert len(world.result.stdout) < 30000


@then("the worker is ready for the next job")
def ready_again() -> None:
    (w,) = _workers()
    deadline = time.monotonic() + 10
    while httpx.get(f"{w['url']}/health").json()["status"] != "ready":
        assert time.monotonic() < deadline
        time.sleep(0.05)


@then("it ran on a second worker, because the first one was busy")
def second_worker(world: World) -> None:
    assert world.doc()["worker"]["id"] != world.first_worker
    assert world.proc is not None
    world.proc.send_signal(signal.SIGINT)
    world.proc.communicate(timeout=30)


@then("the error lists each host with what it needs and what it has")
def every_host_reason(world: World) -> None:
    err = world.error()
    reasons = {r["host"]: r["reason"] for r in err["details"]["rejected"]}
    assert set(reasons) == {"h1", "h2"}
    assert all("needs" in r and "available" in r for r in reasons.values())


@then(parsers.parse('the hint says "{text}"'))
def hint(world: World, text: str) -> None:
    r = world.result
    assert r is not None
    hint_text = world.error()["hint"] if r.stdout.startswith("{") else r.stderr
    assert text in hint_text


@then(parsers.parse("it resumed from byte {n:d} and transferred only the rest"))
def resumed(world: World, hub: HubServer, tiny_bytes: bytes, n: int) -> None:
    doc = world.doc()
    assert doc["resumed_from"] == n and doc["transferred_bytes"] == len(tiny_bytes) - n
    assert hub.gets()[-1].range == f"bytes={n}-"


@then(parsers.parse('one model "{model}" is registered, made of {n:d} files'))
def registered_split(model: str, n: int) -> None:
    (m,) = run("rbee-hive", "models", "list", "--format", "json").json()["models"]
    assert m["id"] == model and len(m["shards"]) == n
    assert m["size"] == sum(s["size"] for s in m["shards"])


@then("no model is registered")
def nothing_registered() -> None:
    assert run("rbee-hive", "models", "list", "--format", "json").json()["models"] == []


@then("the error gives the expected and the actual sha256")
def sha_details(world: World) -> None:
    d = world.error()["details"]
    assert d["expected"] == "0" * 64 and re.fullmatch(r"[0-9a-f]{64}", d["actual"])


@then("the error gives the required and the available bytes")
def memory_details(world: World) -> None:
    d = world.error()["details"]
    assert d["required_bytes"] > d["available_bytes"]


@then(parsers.parse('it suggests "{suggestion}"'))
def suggests(world: World, suggestion: str) -> None:
    assert suggestion in world.error()["details"]["suggestions"]


@then("nothing was downloaded and no command ran")
def nothing_ran(rbee_env: Env) -> None:
    assert not (rbee_env.rbee_home / "downloads").exists()
    for where in (Path.cwd(), rbee_env.home, rbee_env.root):
        assert not (where / "rbee-pwned").exists()


@then(parsers.parse('"{a}" and "{b}" report their status'))
def report_status(world: World, a: str, b: str) -> None:
    hosts = {h["name"]: h for h in world.doc()["hosts"]}
    for name in (a, b):
        assert hosts[name]["ok"] and hosts[name]["status"]["schema"] == "rbee.hive.status/v1"


@then(parsers.parse('"{name}" reports "{code}"'))
def host_reports(world: World, name: str, code: str) -> None:
    hosts = {h["name"]: h for h in world.doc()["hosts"]}
    assert hosts[name]["error"]["code"] == code


@then("the error shows the key's SHA256 fingerprint")
def fingerprint(world: World) -> None:
    assert world.error()["details"]["fingerprint"].startswith("SHA256:")


@then("the key is now in known_hosts")
def known(rbee_env: Env, ssh_pool: SshPool) -> None:
    sshd = ssh_pool.hosts[0].sshd
    text = (rbee_env.home / ".ssh" / "known_hosts").read_text()
    assert f"[{sshd.address}]:{sshd.port} ssh-ed25519" in text


@then(parsers.parse("the error points at {name} line {line:d}"))
def points_at(world: World, rbee_env: Env, name: str, line: int) -> None:
    d = world.error()["details"]
    assert d["file"] == str(rbee_env.config / name) and d["line"] == line
