"""One model across processes with llama.cpp's RPC backend: lenders (`rbee-hive rpc …`) and
workers that borrow from them (`worker spawn --rpc`), real processes on loopback."""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rbee_common.rpc import handshake, protocol_version, rpc_supported
from tests.conftest import Env
from tests.helpers import BIN, error_of, run, sse_events
from tests.test_pool_daemon import Daemon, start_daemon, stop_daemon
from tests.tinymodel import write_tiny_model

pytestmark = pytest.mark.skipif(
    not rpc_supported(), reason="this llama-cpp-python build has no RPC backend "
    '(scripts/bootstrap.sh builds it with CMAKE_ARGS="-DGGML_RPC=on")')

FAST = {"RBEE_RPC_TIMEOUT": "1"}  # a busy lender is told from a slow one after 1 s


def hive(*args: str, code: int = 0, env: dict[str, str] | None = None) -> Any:
    r = run("rbee-hive", *args, "--format", "json", env=env)
    assert r.returncode == code, r
    return r.json()


def start_lender(*args: str) -> dict[str, Any]:
    return dict(hive("rpc", "start", "--device", "cpu:0", "--threads", "1", *args))


def spawn(*args: str, model: str = "tiny") -> dict[str, Any]:
    return dict(hive("worker", "spawn", "cpu", "--model", model, "--threads", "1", *args))


def token_of(wid: str) -> str:
    return str(hive("worker", "token", wid)["token"])


def generate(rec: dict[str, Any], prompt: str = "Hello", n: int = 40) -> str:
    headers = {"Authorization": f"Bearer {token_of(rec['id'])}"}
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "seed": 1}
    r = httpx.post(f"{rec['url']}/execute", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    events = list(sse_events(iter(r.text.splitlines())))
    assert events[-1][0] == "end", events[-3:]
    return "".join(d["t"] for e, d in events if e == "token")


def health(rec: dict[str, Any]) -> dict[str, Any]:
    return dict(httpx.get(f"{rec['url']}/health", timeout=5).json())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def processes_with(needle: str) -> list[int]:
    """Pids whose command line holds `needle` (a worker or lender id)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if needle.encode() in Path(f"/proc/{name}/cmdline").read_bytes():
                    out.append(int(name))
            except OSError:
                continue
    return out


@pytest.fixture
def lender(rbee_env: Env) -> dict[str, Any]:
    return start_lender()


# -- lenders --------------------------------------------------------------------------------


def test_lender_start_list_logs_stop(rbee_env: Env) -> None:
    rec = start_lender()
    assert rec["schema"] == "rbee.hive.lender/v1" and rec["id"].startswith("rpc-cpu0-")
    assert {"id", "device", "endpoint", "port", "pid", "state", "memory_bytes",
            "free_bytes"} <= set(rec)
    assert rec["state"] == "ready" and rec["device"] == "cpu:0" and rec["insecure"] is False
    assert rec["endpoint"] == f"127.0.0.1:{rec['port']}" and 50052 <= rec["port"] <= 50251
    assert rec["memory_bytes"] > 0 and rec["free_bytes"] > 0 and rec["total_bytes"] > 0
    assert running(rec["pid"])
    # it speaks this build's protocol, and lends one device
    info = handshake(rec["endpoint"], timeout=5)
    assert info.version == protocol_version() and len(info.devices) == 1
    assert rec["protocol"] == ".".join(map(str, info.version))
    # only on loopback
    with pytest.raises(OSError):
        socket.create_connection((_lan_address(), rec["port"]), timeout=1).close()

    listed = hive("rpc", "list")
    assert listed["schema"] == "rbee.hive.lenders/v1"
    assert [(x["id"], x["state"], x["endpoint"]) for x in listed["lenders"]] == [
        (rec["id"], "ready", rec["endpoint"])]
    status = hive("status")
    assert [(x["id"], x["device"]) for x in status["lenders"]] == [(rec["id"], "cpu:0")]
    assert status["lenders"][0]["memory_bytes"] > 0
    text = run("rbee-hive", "rpc", "list")
    assert text.returncode == 0 and rec["id"] in text.stdout and rec["endpoint"] in text.stdout

    logs = hive("rpc", "logs", rec["id"])
    assert logs["id"] == rec["id"]
    assert any("Starting RPC server" in line for line in logs["lines"]), logs
    assert any("Accepted client connection" in line for line in logs["lines"]), logs

    stopped = hive("rpc", "stop", rec["id"])
    assert (stopped["id"], stopped["signal"]) == (rec["id"], "SIGTERM")
    assert wait_gone(rec["pid"]) and hive("rpc", "list")["lenders"] == []
    err = error_of(run("rbee-hive", "rpc", "stop", rec["id"], "--format", "json"))
    assert err["code"] == "LENDER_NOT_FOUND" and err["hint"]


def _lan_address() -> str:
    """An address of this host that is not loopback (the one a default route would use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent
            addr = str(s.getsockname()[0])
        except OSError:
            pytest.skip("this host has no address beyond loopback")
    if addr.startswith("127."):
        pytest.skip("this host has no address beyond loopback")
    return addr


def test_a_lender_beyond_loopback_needs_insecure(rbee_env: Env) -> None:
    r = run("rbee-hive", "rpc", "start", "--device", "cpu:0", "--bind", "0.0.0.0",
            "--format", "json")
    assert r.returncode == 2, r
    err = error_of(r)
    assert err["code"] == "USAGE" and "--insecure" in err["hint"]
    assert hive("rpc", "list")["lenders"] == []
    err = error_of(run("rbee-hive", "rpc", "start", "--device", "cpu:0", "--insecure",
                       "--format", "json"))
    assert err["code"] == "USAGE" and "--bind" in err["message"]
    err = error_of(run("rbee-hive", "rpc", "start", "--device", "gpu7", "--format", "json"))
    assert err["code"] == "USAGE"

    rec = start_lender("--bind", "0.0.0.0", "--insecure")
    assert rec["insecure"] is True and rec["endpoint"] == f"127.0.0.1:{rec['port']}"
    socket.create_connection((_lan_address(), rec["port"]), timeout=2).close()
    text = run("rbee-hive", "rpc", "list")
    assert rec["id"] in text.stdout


def test_a_dead_lender_is_noticed(lender: dict[str, Any]) -> None:
    os.kill(lender["pid"], signal.SIGKILL)
    assert wait_gone(lender["pid"])
    (dead,) = hive("rpc", "list")["lenders"]
    assert (dead["id"], dead["state"], dead["memory_bytes"]) == (lender["id"], "dead", 0)
    assert "gone" in dead["message"]
    assert hive("rpc", "stop", lender["id"])["was"] == "dead"


# -- borrowers ------------------------------------------------------------------------------


def test_a_split_worker_writes_what_a_local_one_writes(tiny_registered: str,
                                                        lender: dict[str, Any]) -> None:
    local = spawn()
    want = generate(local)
    assert want.startswith("pqrstuvwxyz abc")
    assert hive("worker", "stop", local["id"])["id"] == local["id"]

    rec = spawn("--rpc", lender["endpoint"])
    endpoint = lender["endpoint"]
    assert rec["rpc"] == [endpoint] and rec["state"] == "ready"
    assert [d["device"] for d in rec["split"]] == [f"rpc:{endpoint}", "cpu:0"]
    assert abs(sum(d["share"] for d in rec["split"]) - 1) < 1e-3
    assert len(rec["tensor_split"]) == 2
    assert generate(rec) == want

    doc = health(rec)
    assert doc["rpc"] == [endpoint]
    split = {d["device"]: d for d in doc["split"]}
    assert set(split) == {f"rpc:{endpoint}", "cpu:0"}
    assert split[f"rpc:{endpoint}"]["bytes"] > 0 and split["cpu:0"]["bytes"] > 0
    assert abs(sum(d["share"] for d in doc["split"]) - 1) < 1e-3
    (listed,) = hive("worker", "list")["workers"]
    assert listed["rpc"] == [endpoint] and listed["split"] == rec["split"]
    # the worker holds the lender: it is busy while the worker lives
    (busy,) = hive("rpc", "list")["lenders"]
    assert busy["state"] == "busy"
    log = Path(rec["log"]).read_text()
    assert "RPC0" in log or "borrowing" in log


def test_a_quantised_model_splits_too(rbee_env: Env, tmp_path: Path,
                                      lender: dict[str, Any]) -> None:
    model = write_tiny_model(tmp_path / "q4.gguf", quant="Q4_0", n_layers=4)
    assert run("rbee-hive", "models", "import", str(model), "--id", "q4").returncode == 0
    local = spawn(model="q4")
    want = generate(local, "The", 24)
    hive("worker", "stop", local["id"])
    rec = spawn("--rpc", lender["endpoint"], "--tensor-split", "0.75,0.25", model="q4")
    assert rec["tensor_split"] == [0.75, 0.25]
    assert generate(rec, "The", 24) == want
    split = {d["device"]: d["share"] for d in health(rec)["split"]}
    assert split == {f"rpc:{lender['endpoint']}": 0.75, "cpu:0": 0.25}


def test_an_unreachable_lender_is_a_coded_error_and_leaves_nothing(tiny_registered: str,
                                                                   tiny_model: Path,
                                                                   rbee_env: Env) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    r = run("rbee-hive", "worker", "spawn", "cpu", "--model", "tiny", "--rpc", endpoint,
            "--format", "json")
    assert r.returncode == 1, r
    err = error_of(r)
    assert err["code"] == "RPC_LENDER_UNREACHABLE" and endpoint in err["message"]
    assert err["details"]["endpoint"] == endpoint and "rbee-hive rpc" in err["hint"]
    assert hive("worker", "list")["workers"] == []
    workers = rbee_env.rbee_home / "workers"
    assert not workers.exists() or not [p for p in workers.iterdir() if p.name != ".lock"]
    assert processes_with(str(rbee_env.rbee_home)) == []

    # the worker itself refuses too (were it started by other means): exit 1 with a coded
    # last line, never llama.cpp's abort
    worker = BIN / "llm-worker-rbee"
    import subprocess

    proc = subprocess.run(
        [str(worker), "--model", str(tiny_model), "--backend", "cpu", "--port",
         str(free_port()), "--worker-id", "cpu0-test00", "--rpc", endpoint],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "RBEE_WORKER_TOKEN": "x" * 32})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert '"code": "RPC_LENDER_UNREACHABLE"' in proc.stderr.splitlines()[-1]


class _Peer:
    """A socket server on loopback that plays a lender of another sort: one that accepts and
    never answers (llama.cpp's server while it serves another client), or one that answers
    HELLO with another protocol version."""

    def __init__(self, version: tuple[int, int, int] | None) -> None:
        self.version = version
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.version is not None:
                conn.recv(1 + 8 + 24)
                conn.sendall(struct.pack("<QBBBB24s", 28, *self.version, 0, bytes(24)))

    def close(self) -> None:
        for c in [self.sock, *self.conns]:
            c.close()


@pytest.fixture
def peer(request: pytest.FixtureRequest) -> Iterator[_Peer]:
    p = _Peer(request.param)
    yield p
    p.close()


@pytest.mark.parametrize("peer", [None], indirect=True)
def test_a_silent_lender_reads_as_busy(tiny_registered: str, peer: _Peer) -> None:
    t0 = time.monotonic()
    r = run("rbee-hive", "worker", "spawn", "cpu", "--model", "tiny", "--rpc", peer.endpoint,
            "--format", "json", env=FAST)
    assert r.returncode == 1 and time.monotonic() - t0 < 20, r
    err = error_of(r)
    assert err["code"] == "RPC_LENDER_BUSY" and peer.endpoint in err["message"], err
    assert hive("worker", "list")["workers"] == []


@pytest.mark.parametrize("peer", [(6, 1, 0)], indirect=True)
def test_a_lender_of_another_version_is_refused(tiny_registered: str, peer: _Peer) -> None:
    err = error_of(run("rbee-hive", "worker", "spawn", "cpu", "--model", "tiny", "--rpc",
                       peer.endpoint, "--format", "json"))
    assert err["code"] == "RPC_PROTOCOL_MISMATCH" and peer.endpoint in err["message"]
    assert "6.1.0" in err["message"] and err["details"]["lender_version"] == "6.1.0"
    assert hive("worker", "list")["workers"] == []


def test_a_busy_lender_is_a_coded_error(tiny_registered: str, lender: dict[str, Any]) -> None:
    first = spawn("--rpc", lender["endpoint"])
    r = run("rbee-hive", "worker", "spawn", "cpu", "--model", "tiny", "--rpc",
            lender["endpoint"], "--format", "json", env=FAST)
    assert r.returncode == 1, r
    err = error_of(r)
    assert err["code"] == "RPC_LENDER_BUSY" and lender["endpoint"] in err["message"]
    assert [w["id"] for w in hive("worker", "list")["workers"]] == [first["id"]]
    assert generate(first).startswith("pqr")  # the first borrower is unharmed


def test_a_lender_lost_mid_stream_ends_the_stream_and_names_the_lender(
        tiny_registered: str, lender: dict[str, Any]) -> None:
    rec = spawn("--rpc", lender["endpoint"], "--ctx", "8192")
    headers = {"Authorization": f"Bearer {token_of(rec['id'])}"}
    body = {"prompt": "Hello", "max_tokens": 8000, "temperature": 0}
    events: list[str] = []
    t0 = time.monotonic()
    with httpx.stream("POST", f"{rec['url']}/execute", json=body, headers=headers,
                      timeout=30) as resp:
        assert resp.status_code == 200
        with pytest.raises(httpx.HTTPError):  # the worker dies: the stream breaks off
            for event, _ in sse_events(resp.iter_lines()):
                events.append(event)
                if events.count("token") == 5:
                    os.kill(lender["pid"], signal.SIGKILL)
    assert "end" not in events and time.monotonic() - t0 < 30
    assert wait_gone(rec["pid"])
    (dead,) = hive("worker", "list")["workers"]
    assert dead["state"] == "dead"
    assert f"RPC lender {lender['endpoint']} is gone" in dead["message"], dead["message"]
    assert dead["lost_lenders"][0]["endpoint"] == lender["endpoint"]
    err = error_of(run("rbee-hive", "worker", "health", rec["id"], "--format", "json"))
    assert err["code"] == "WORKER_CRASHED" and lender["endpoint"] in err["message"]
    assert "RBEE_ERROR" in Path(rec["log"]).read_text()  # the worker's own last words


def test_a_lender_lost_while_idle_is_told_before_the_next_job(
        tiny_registered: str, lender: dict[str, Any]) -> None:
    rec = spawn("--rpc", lender["endpoint"])
    log = Path(lender["log"])
    accepted = log.read_text().count("Accepted client connection")
    for _ in range(5):  # watching costs the lender nothing: no connection of ours queues
        assert hive("status")["workers"][0]["state"] == "ready"
        assert hive("rpc", "list")["lenders"][0]["state"] == "busy"
    assert log.read_text().count("Accepted client connection") == accepted
    os.kill(lender["pid"], signal.SIGKILL)
    assert wait_gone(lender["pid"])
    deadline = time.monotonic() + 10
    while (w := hive("worker", "list")["workers"][0])["state"] != "error":
        assert time.monotonic() < deadline, w
        time.sleep(0.1)
    assert w["id"] == rec["id"] and f"RPC lender {lender['endpoint']} is gone" in w["message"]


def test_status_with_lenders_stays_light(tiny_registered: str, lender: dict[str, Any]) -> None:
    import subprocess
    import sys

    spawn("--rpc", lender["endpoint"])
    code = ("import sys; from rbee_hive.status import status; doc = status(); "
            "assert doc['lenders'] and doc['workers']; "
            "print(sorted(m for m in ('llama_cpp', 'fastapi', 'starlette', 'paramiko', 'httpx',"
            " 'pydantic', 'gguf', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_what_a_lender_holds_counts_against_the_hosts_cap(tiny_registered: str,
                                                         lender: dict[str, Any]) -> None:
    mib = 1024 * 1024
    held = hive("rpc", "list")["lenders"][0]["memory_bytes"]
    assert held > 4 * mib  # a lender process holds some memory before it lends any
    argv = ("rbee-hive", "worker", "spawn", "cpu", "--model", "tiny", "--threads", "1",
            "--format", "json")
    refused = run(*argv, env={"RBEE_MAX_RAM_MIB": "1"})
    need = error_of(refused)["details"]["required_bytes"]
    # a cap that holds the worker alone, but not beside what the lender holds
    cap = {"RBEE_MAX_RAM_MIB": str((need + held // 2) // mib + 1)}
    short = error_of(run(*argv, env=cap))
    assert short["code"] == "INSUFFICIENT_RAM", short
    hive("rpc", "stop", lender["id"])
    rec = hive(*argv[1:-2], env=cap)
    assert rec["state"] == "ready"


def test_worker_stop_all_sweeps_lenders(tiny_registered: str, lender: dict[str, Any]) -> None:
    rec = spawn("--rpc", lender["endpoint"])
    other = start_lender()
    stopped = hive("worker", "stop", "--all")
    assert sorted(s["id"] for s in stopped["stopped"]) == sorted(
        [rec["id"], lender["id"], other["id"]])
    for pid in (rec["pid"], lender["pid"], other["pid"]):
        assert wait_gone(pid)
    assert hive("rpc", "list")["lenders"] == [] and hive("worker", "list")["workers"] == []


@pytest.fixture
def pool_daemon(rbee_env: Env) -> Iterator[Daemon]:
    d = start_daemon(rbee_env.rbee_home)
    yield d
    stop_daemon(rbee_env.rbee_home)


def test_a_split_worker_through_the_pool_daemon(tiny_registered: str, lender: dict[str, Any],
                                                pool_daemon: Daemon) -> None:
    rec = spawn("--rpc", lender["endpoint"])  # the CLI hands it to the running daemon
    assert rec["rpc"] == [lender["endpoint"]] and generate(rec).startswith("pqr")
    assert rec["id"] in pool_daemon.log()
    state = pool_daemon.get("/v2/state").json()
    assert [x["id"] for x in state["lenders"]] == [lender["id"]]
    stopped = hive("worker", "stop", "--all")
    assert sorted(x["id"] for x in stopped["stopped"]) == sorted([rec["id"], lender["id"]])
