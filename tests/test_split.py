"""One model across two hosts: `rbee infer --split`, real sshd hosts on loopback, a real
llama.cpp worker borrowing the other host's device over RPC through the controller's SSH."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SshHost, SshPool
from tests.helpers import error_of, popen, run
from tests.hubserver import HubServer

pytestmark = pytest.mark.ssh

REPO = "rbee-test/Tiny-GGUF"
SOURCE = f"hf:{REPO}/tiny.gguf"
MiB = 1024 * 1024


def rpc_supported() -> bool:
    try:
        from llama_cpp import llama_cpp
    except ImportError:
        return False
    return bool(llama_cpp.llama_supports_rpc())


if not rpc_supported():  # scripts/bootstrap.sh builds with RPC: in CI these run
    pytestmark = [pytestmark, pytest.mark.skip(reason="llama-cpp-python built without RPC")]


@pytest.fixture
def catalog(rbee_env: Any, hub: HubServer, tiny_bytes: bytes) -> str:
    hub.add_repo_file(REPO, "tiny.gguf", tiny_bytes)
    (rbee_env.config / "catalog.toml").write_text(
        f'[[models]]\nid = "tiny-hf"\nname = "Tiny"\nsource = "{SOURCE}"\n')
    return "tiny-hf"


def infer(*args: str) -> dict[str, Any]:
    r = run("rbee", "infer", *args, "--temperature", "0", "--format", "json", timeout=180)
    assert r.returncode == 0, r
    return dict(r.json())


def hive(h: SshHost, *args: str) -> Any:
    """rbee-hive on that host's own state, as the host would run it."""
    r = run("rbee-hive", *args, "--format", "json",
            env={"RBEE_HOME": str(h.rbee_home), "RBEE_CONFIG_DIR": str(h.config)})
    assert r.returncode == 0, r
    return r.json()


def nothing_left(*hosts: SshHost) -> None:
    for h in hosts:
        assert hive(h, "worker", "list")["workers"] == [], h.name
        assert hive(h, "rpc", "list")["lenders"] == [], h.name


def test_a_split_gives_the_unsplit_greedy_text_and_names_both_hosts(
        ssh_pool: SshPool, catalog: str) -> None:
    h1, h2 = ssh_pool.start(2)
    alone = infer("--model", catalog, "--prompt", "Hello", "--max-tokens", "24",
                  "--host", "h1")
    run("rbee", "workers", "stop", "--all")
    split = infer("--model", catalog, "--prompt", "Hello", "--max-tokens", "24",
                  "--split", "h1,h2")
    assert split["text"] == alone["text"] and split["tokens"] == 24
    chosen = split["placement"]["chosen"]
    assert split["host"] == "h1" and chosen["split"]["primary"] == "h1"
    assert chosen["split"]["hosts"] == ["h1", "h2"]
    devices = chosen["split"]["devices"]
    assert [(d["host"], d["role"]) for d in devices] == [("h2", "lender"), ("h1", "worker")]
    assert abs(sum(d["fraction"] for d in devices) - 1) < 0.01
    assert all(d["share_bytes"] > 0 for d in devices)
    assert "split across 2 hosts" in chosen["reason"]
    nothing_left(h1, h2)  # the worker, its lender and the tunnel end with the job

    text = run("rbee", "infer", "--model", catalog, "--prompt", "Hello", "--max-tokens", "4",
               "--temperature", "0", "--split", "h2,h1", timeout=180)
    assert text.returncode == 0, text
    assert "split across 2 hosts: h1 cpu:0" in text.stderr and "h2 cpu:0" in text.stderr
    nothing_left(h1, h2)


@pytest.fixture(scope="session")
def q4_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The tiny model four layers deep with Q4_0 matrices (llama.cpp's quantised kernels,
    and quantised tensors sent to the lender)."""
    from tests.tinymodel import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("q4") / "q4.gguf", quant="Q4_0",
                            n_layers=4).read_bytes()


def test_a_quantised_model_split_gives_the_unsplit_greedy_text(
        ssh_pool: SshPool, rbee_env: Any, hub: HubServer, q4_bytes: bytes) -> None:
    hub.add_repo_file("rbee-test/Q4-GGUF", "q4.gguf", q4_bytes)
    (rbee_env.config / "catalog.toml").write_text(
        '[[models]]\nid = "q4"\nname = "Q4"\nsource = "hf:rbee-test/Q4-GGUF/q4.gguf"\n')
    h1, h2 = ssh_pool.start(2)
    alone = infer("--model", "q4", "--prompt", "Hello", "--max-tokens", "32", "--host", "h2")
    run("rbee", "workers", "stop", "--all")
    split = infer("--model", "q4", "--prompt", "Hello", "--max-tokens", "32",
                  "--split", "h2,h1")
    assert split["text"] == alone["text"] and split["tokens"] == 32
    assert split["placement"]["chosen"]["split"]["hosts"] == ["h2", "h1"]
    nothing_left(h1, h2)


def test_insecure_rpc_lends_on_the_hosts_address_and_skips_the_tunnel(
        ssh_pool: SshPool, catalog: str) -> None:
    h1, h2 = ssh_pool.start(2)
    r = popen("rbee", "infer", "--model", catalog, "--prompt", "Hello", "--max-tokens",
              "100000", "--temperature", "0", "--split", "h1,h2", "--insecure-rpc",
              "--format", "ndjson")
    try:
        assert r.stdout is not None
        for line in r.stdout:
            if json.loads(line).get("event") == "token":
                break
        (lender,) = hive(h2, "rpc", "list")["lenders"]
        (worker,) = hive(h1, "worker", "list")["workers"]
        pool = run("rbee", "pool", "status")  # the lender shows beside the workers
        assert pool.returncode == 0 and f"{lender['id']} busy (lends cpu:0)" in pool.stdout, pool
        r.send_signal(signal.SIGINT)  # Ctrl+C: the job ends, and its worker and lender
        assert r.wait(timeout=60) != 0
    finally:
        if r.poll() is None:
            r.kill()
    nothing_left(h1, h2)
    # (a 127.0.0.x address is still loopback to the hive, so it does not mark it insecure)
    assert lender["endpoint"] == f"{h2.sshd.address}:{lender['port']}"  # on the LAN side
    assert worker["rpc"] == [lender["endpoint"]]  # reached directly, not through 127.0.0.1
    doc = infer("--model", catalog, "--prompt", "Hello", "--max-tokens", "8",
                "--split", "h1,h2", "--insecure-rpc")
    assert doc["text"] == "pqrstuvw"
    nothing_left(h1, h2)


def test_a_model_neither_host_holds_alone_is_split_on_its_own(ssh_pool: SshPool,
                                                               catalog: str) -> None:
    ssh_pool.start(1)  # h1: learn the estimate (a long context: its KV cache is 8 MiB)
    est = infer("--model", catalog, "--prompt", "Hello", "--max-tokens", "1",
                "--ctx", "32768")["placement"]["estimate"]
    body = est["weights_bytes"] + est["kv_bytes"]
    assert body > 8 * MiB, est  # room enough for a cap between "one half" and "all of it"
    # each of h2 and h3 may use the overhead plus three quarters of the body: not all of it
    cap = (est["overhead_bytes"] + body * 3 // 4) // MiB
    h2, h3 = ssh_pool.start(2, extra_env={"RBEE_MAX_RAM_MIB": str(cap)})
    doc = infer("--model", catalog, "--prompt", "Hello", "--max-tokens", "8",
                "--ctx", "32768", "--host", "h2", "--host", "h3")
    split = doc["placement"]["chosen"]["split"]
    assert split is not None and sorted(split["hosts"]) == ["h2", "h3"]
    rejected = {r["host"]: r["reason"] for r in doc["placement"]["rejected"]}
    for h in ("h2", "h3"):  # each alone: the whole model against its cap
        assert rejected[h].startswith("needs") and f"{cap}.0 MiB available" in rejected[h]
    assert doc["text"] == "pqrstuvw"
    nothing_left(h2, h3)


def test_a_lender_killed_mid_stream_ends_the_job_naming_it(ssh_pool: SshPool,
                                                           catalog: str) -> None:
    h1, h2 = ssh_pool.start(2)
    proc = popen("rbee", "infer", "--model", catalog, "--prompt", "Hello", "--max-tokens",
                 "100000", "--temperature", "0", "--split", "h1,h2", "--format", "ndjson")
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # wait for the stream to begin
            if json.loads(line).get("event") == "token":
                break
        (lender,) = hive(h2, "rpc", "list")["lenders"]
        os.kill(lender["pid"], signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)  # it ends: never a hang
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    last = json.loads(out.strip().splitlines()[-1])
    error = last.get("error") or last
    assert error["code"] == "WORKER_CRASHED", last
    assert f"h2 {lender['id']}" in error["message"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the crashed worker and the lender are swept
        if not hive(h1, "worker", "list")["workers"]:
            break
        time.sleep(0.5)
    nothing_left(h1, h2)


def test_a_lender_host_that_is_down_is_a_coded_error_and_nothing_is_left(
        ssh_pool: SshPool, catalog: str) -> None:
    h1, h2 = ssh_pool.start(2)
    h2.sshd.stop()
    r = run("rbee", "infer", "--model", catalog, "--prompt", "Hello", "--split", "h1,h2",
            "--format", "json", timeout=120)
    assert r.returncode != 0
    err = error_of(r)
    assert err["code"] == "NO_PLACEMENT" and "h2" in err["message"]
    assert "HOST_UNREACHABLE" in err["message"]
    assert hive(h1, "worker", "list")["workers"] == []
    assert hive(h1, "rpc", "list")["lenders"] == []


@pytest.mark.parametrize("bad", ["h1", "h1,h1", "h1,", "h1,nope"])
def test_split_takes_two_or_more_known_hosts(ssh_pool: SshPool, catalog: str, bad: str,
                                             tmp_path: Path) -> None:
    ssh_pool.start(1)
    r = run("rbee", "infer", "--model", catalog, "--prompt", "x", "--split", bad,
            "--format", "json")
    err = error_of(r)
    assert err["code"] == ("UNKNOWN_HOST" if bad == "h1,nope" else "USAGE"), r
    assert r.returncode != 0
