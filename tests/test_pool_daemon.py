"""The pool daemon (M1): real daemons, real workers on the tiny model, real HTTP on loopback,
and real sshd hosts for the controller's side."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from rbee_common.daemon import pid_alive
from rbee_keeper.queen.tokens import heartbeat_token
from tests.conftest import Env, SshHost, SshPool
from tests.helpers import error_of, run, sse_events
from tests.hubserver import HubServer
from tests.sshd import free_port

REPO = "rbee-test/Tiny-GGUF"
# the keys of the daemon's documents, pinned as tests/test_contracts.py pins the others'
DAEMON_DOC = ["bind", "health", "log", "pid", "port", "queen_url", "running", "schema",
              "signal", "started_at", "url"]
DAEMON_HEALTH = ["queen", "rbee_home", "schema", "status", "uptime_s", "url", "version",
                 "watch"]
QUEEN_LINK = ["failed", "host", "last_error", "last_ok_at", "sent", "url"]


@dataclass
class Daemon:
    url: str
    token: str
    pid: int
    home: Path

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def log(self) -> str:
        return (self.home / "pool-daemon.log").read_text()

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.auth, timeout=30, **kw)

    def post(self, path: str, body: Any, **kw: Any) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self.auth, timeout=60, **kw)


def start_daemon(home: Path, *args: str, env: dict[str, str] | None = None) -> Daemon:
    port = free_port("127.0.0.1")
    r = run("rbee-hive", "daemon", "start", "--port", str(port), *args, "--format", "json",
            env={"RBEE_HOME": str(home), **(env or {})})
    assert r.returncode == 0, r
    doc = r.json()
    token = run("rbee-hive", "daemon", "token", "--format", "json",
                env={"RBEE_HOME": str(home)}).json()["token"]
    return Daemon(doc["url"], token, doc["pid"], home)


def stop_daemon(home: Path) -> None:
    run("rbee-hive", "daemon", "stop", env={"RBEE_HOME": str(home)})


@pytest.fixture
def hive_daemon(rbee_env: Env) -> Iterator[Daemon]:
    """A pool daemon on this test's RBEE_HOME (stopped after the test)."""
    d = start_daemon(rbee_env.rbee_home)
    yield d
    stop_daemon(rbee_env.rbee_home)


def wait_until(what: str, check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def ppid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid")))


def record_on_disk(home: Path, wid: str) -> dict[str, Any]:
    return dict(json.loads((home / "workers" / f"{wid}.json").read_text()))


def without_free_memory(doc: dict[str, Any]) -> dict[str, Any]:
    """A status document less what changes from one moment to the next (free memory)."""
    doc = json.loads(json.dumps(doc))
    for d in doc["devices"]:
        d.pop("memory_free", None)
    return doc


# the daemon itself

def test_start_status_token_stop_and_the_files_it_keeps(rbee_env: Env) -> None:
    home = rbee_env.rbee_home
    never = run("rbee-hive", "daemon", "token", "--format", "json")
    assert never.returncode == 1 and error_of(never)["code"] == "DAEMON_NOT_RUNNING"
    down = run("rbee-hive", "daemon", "status", "--format", "json")
    assert down.returncode == 0 and down.json()["running"] is False
    assert sorted(down.json()) == DAEMON_DOC

    port = free_port("127.0.0.1")
    started = run("rbee-hive", "daemon", "start", "--port", str(port))
    assert started.returncode == 0, started
    assert f"http://127.0.0.1:{port}" in started.stdout  # text mode prints its URL
    assert httpx.get(f"http://127.0.0.1:{port}/health").json()["status"] == "ok"
    for name in ("pool-daemon.token", "pool-daemon.json", "pool-daemon.log"):
        assert stat.S_IMODE((home / name).stat().st_mode) == 0o600, name

    doc = run("rbee-hive", "daemon", "status", "--format", "json").json()
    assert doc["schema"] == "rbee.hive.daemon/v1" and doc["running"] is True
    assert sorted(doc) == DAEMON_DOC and sorted(doc["health"]) == DAEMON_HEALTH
    assert (doc["url"], doc["port"], doc["bind"]) == (f"http://127.0.0.1:{port}", port,
                                                      "127.0.0.1")
    assert doc["health"]["status"] == "ok" and doc["health"]["queen"] is None
    token = run("rbee-hive", "daemon", "token", "--format", "json").json()["token"]
    assert token == (home / "pool-daemon.token").read_text().strip() and len(token) >= 32
    assert run("rbee-hive", "daemon", "token").stdout.strip() == token

    again = run("rbee-hive", "daemon", "start", "--port", str(free_port("127.0.0.1")),
                "--format", "json")
    assert again.returncode == 1 and error_of(again)["code"] == "DAEMON_ALREADY_RUNNING"

    stopped = run("rbee-hive", "daemon", "stop", "--format", "json")
    assert stopped.returncode == 0, stopped
    assert stopped.json()["running"] is False and stopped.json()["signal"] == "SIGTERM"
    assert sorted(stopped.json()) == DAEMON_DOC
    assert not pid_alive(doc["pid"])
    assert not (home / "pool-daemon.json").exists()
    assert "pool daemon stopped" in (home / "pool-daemon.log").read_text()  # a clean exit
    gone = run("rbee-hive", "daemon", "stop", "--format", "json")
    assert gone.returncode == 1 and error_of(gone)["code"] == "DAEMON_NOT_RUNNING"

    # the token outlives the daemon: a restart keeps what clients know
    d = start_daemon(home)
    try:
        assert d.token == token
    finally:
        stop_daemon(home)


def test_a_taken_port_fails_the_start(rbee_env: Env, hive_daemon: Daemon) -> None:
    port = hive_daemon.url.rsplit(":", 1)[1]
    r = run("rbee-hive", "daemon", "start", "--port", port, "--format", "json",
            env={"RBEE_HOME": str(rbee_env.root / "other-home")})
    assert r.returncode == 1
    err = error_of(r)
    assert err["code"] == "DAEMON_START_FAILED" and "Read its log" in err["hint"]


def test_every_route_but_health_needs_the_token(hive_daemon: Daemon) -> None:
    from starlette.routing import Route

    from rbee_hive.daemon.app import routes

    paths = [(m, r.path.replace("{wid}", "cpu0-abcdef")) for r in routes()
             if isinstance(r, Route) for m in sorted(r.methods or ()) if m != "HEAD"]
    assert {("GET", "/v2/state"), ("POST", "/v2/workers/start"), ("POST", "/v2/workers/stop"),
            ("GET", "/v2/workers"), ("GET", "/v2/workers/cpu0-abcdef/logs"),
            ("GET", "/v2/workers/cpu0-abcdef/token"),
            ("POST", "/v2/models/download")} <= set(paths)
    # the client's path goes to the log as a quoted literal: no forged line, no escape code
    httpx.get(hive_daemon.url + "/v2/state%0A2026-01-01 INFO rbee.hive.daemon: forged%1b[2J")
    for method, path in paths:
        for headers, reason in (({}, "missing"),
                                ({"Authorization": "Bearer not-the-token-at-all"}, "wrong"),
                                ({"Authorization": f"Basic {hive_daemon.token}"}, "wrong")):
            r = httpx.request(method, hive_daemon.url + path, headers=headers, json={})
            if path == "/health":
                assert r.status_code == 200
                continue
            assert r.status_code == 401, (method, path, headers)
            assert r.json()["error"]["code"] == "UNAUTHORIZED", (method, path)
            assert reason in r.json()["error"]["message"]
            assert r.headers["www-authenticate"] == "Bearer"
    said = hive_daemon.log()
    assert "refused a request to '/v2/state\\n2026-01-01 INFO" in said, said
    assert "\x1b" not in said and "\nforged" not in said and "\n2026-01-01 INFO" not in said
    assert said.count("refused a request") == 1  # then quiet for a minute: a LAN can knock
    assert hive_daemon.token not in said


def test_state_is_the_status_document(tiny_registered: str, rbee_env: Env) -> None:
    spawned = run("rbee-hive", "worker", "spawn", "cpu", "--model", "tiny", "--format", "json")
    assert spawned.returncode == 0, spawned
    direct = run("rbee-hive", "status", "--format", "json").json()
    d = start_daemon(rbee_env.rbee_home)
    try:
        served = d.get("/v2/state").json()
        through = run("rbee-hive", "status", "--format", "json").json()
    finally:
        stop_daemon(rbee_env.rbee_home)
    assert served["schema"] == "rbee.hive.status/v1"
    assert [w["state"] for w in served["workers"]] == ["ready"]
    assert without_free_memory(served) == without_free_memory(direct)
    assert without_free_memory(through) == without_free_memory(direct)


# workers through HTTP

def test_spawn_list_logs_token_stop_over_http(tiny_registered: str, hive_daemon: Daemon) -> None:
    token = "a-worker-token-of-our-own-0123456789"
    r = hive_daemon.post("/v2/workers/start", {"backend": "cpu", "model": "tiny", "ctx": 512,
                                               "token": token})
    assert r.status_code == 200, r.text
    rec = r.json()
    assert rec["schema"] == "rbee.hive.worker/v1" and rec["state"] == "ready"
    assert ppid(rec["pid"]) == hive_daemon.pid  # the daemon started it
    worker_auth = {"Authorization": f"Bearer {token}"}
    assert httpx.get(rec["url"] + "/v1/models", headers=worker_auth).status_code == 200
    assert hive_daemon.get(f"/v2/workers/{rec['id']}/token").json()["token"] == token

    # with an event stream: progress, then the record
    events = []
    with httpx.stream("POST", hive_daemon.url + "/v2/workers/start", timeout=60,
                      json={"backend": "cpu", "model": "tiny", "ctx": 512, "device": [0]},
                      headers={**hive_daemon.auth, "Accept": "text/event-stream"}) as resp:
        assert resp.status_code == 200
        events = list(sse_events(resp.iter_lines()))
    names = [e for e, _ in events]
    assert names[0] == "phase" and "done" in names and names[-1] == "result", names
    second = events[-1][1]
    assert second["state"] == "ready" and second["id"] != rec["id"]

    listed = hive_daemon.get("/v2/workers").json()
    assert listed["schema"] == "rbee.hive.workers/v1"
    assert sorted(w["id"] for w in listed["workers"]) == sorted([rec["id"], second["id"]])
    health = hive_daemon.get(f"/v2/workers/{rec['id']}/health").json()
    assert health["status"] == "ready" and health["worker_id"] == rec["id"]
    logs = hive_daemon.get(f"/v2/workers/{rec['id']}/logs", params={"lines": 5}).json()
    assert logs["schema"] == "rbee.hive.logs/v1" and len(logs["lines"]) <= 5
    assert any(f"as {rec['id']}" in line for line in logs["lines"])

    # follow: the last line, then the stream ends when the worker is stopped
    followed: list[str] = []

    def follow() -> None:
        with httpx.stream("GET", hive_daemon.url + f"/v2/workers/{rec['id']}/logs",
                          params={"lines": 1, "follow": 1}, timeout=30,
                          headers={**hive_daemon.auth, "Accept": "text/event-stream"}) as resp:
            for event, data in sse_events(resp.iter_lines()):
                assert event == "line"
                followed.append(data["line"])

    follower = threading.Thread(target=follow)
    follower.start()
    wait_until("the followed log's last line", lambda: followed)
    stopped = hive_daemon.post("/v2/workers/stop", {"id": rec["id"], "timeout": 5})
    assert stopped.status_code == 200 and stopped.json()["id"] == rec["id"]
    follower.join(timeout=10)
    assert not follower.is_alive() and f"as {rec['id']}" in followed[0]
    assert not Path(f"/proc/{rec['pid']}").exists()  # stopped and reaped: no zombie left

    all_ = hive_daemon.post("/v2/workers/stop", {"all": True}).json()
    assert [s["id"] for s in all_["stopped"]] == [second["id"]]
    assert hive_daemon.get("/v2/workers").json()["workers"] == []
    assert token not in hive_daemon.log()  # the worker token never reaches a log


def test_http_errors_carry_the_envelope_and_the_exit_code(tiny_registered: str,
                                                          hive_daemon: Daemon) -> None:
    r = hive_daemon.post("/v2/workers/stop", {"id": "cpu0-000000"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "WORKER_NOT_FOUND" and r.json()["exit_code"] == 1
    r = hive_daemon.post("/v2/workers/start", {"backend": "cpu", "model": "tiny",
                                               "device": [0, 1]})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "USAGE" and r.json()["exit_code"] == 2
    r = hive_daemon.post("/v2/workers/start", {"backend": "tpu", "model": "tiny"})
    assert r.status_code == 400 and r.json()["error"]["details"]["field"] == "backend"
    r = hive_daemon.post("/v2/workers/stop", {"id": "x", "all": True})
    assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_REQUEST"
    r = hive_daemon.post("/v2/workers/start", {"backend": "cpu", "model": "tiny",
                                               "token": "short"})
    assert r.status_code == 400 and r.json()["error"]["details"]["field"] == "token"
    r = hive_daemon.get("/v2/nowhere")
    assert r.status_code == 404 and r.json()["error"]["code"] == "INVALID_REQUEST"


def test_a_download_streams_its_progress(hub: HubServer, hive_daemon: Daemon,
                                         tiny_bytes: bytes) -> None:
    # (hub first: the daemon keeps the environment it starts with, HF_ENDPOINT included)
    hub.add_repo_file(REPO, "tiny.gguf", tiny_bytes)
    events = []
    with httpx.stream("POST", hive_daemon.url + "/v2/models/download", timeout=60,
                      json={"ref": f"hf:{REPO}/tiny.gguf", "id": "tiny-hf"},
                      headers={**hive_daemon.auth, "Accept": "text/event-stream"}) as resp:
        assert resp.status_code == 200
        events = list(sse_events(resp.iter_lines()))
    names = [e for e, _ in events]
    assert names[0] == "phase" and "progress" in names and "done" in names
    assert names[-1] == "result"
    phase = events[0][1]
    assert phase["phase"] == "download" and phase["total"] == len(tiny_bytes)
    result = events[-1][1]
    assert result["schema"] == "rbee.hive.model/v1" and result["id"] == "tiny-hf"
    assert result["transferred_bytes"] == len(tiny_bytes)

    with httpx.stream("POST", hive_daemon.url + "/v2/models/download", timeout=60,
                      json={"ref": f"hf:{REPO}/missing.gguf"},
                      headers={**hive_daemon.auth, "Accept": "text/event-stream"}) as resp:
        events = list(sse_events(resp.iter_lines()))
    assert events[-1][0] == "error"
    assert events[-1][1]["error"]["code"] == "MODEL_NOT_FOUND"
    assert events[-1][1]["exit_code"] == 1


def test_a_killed_worker_is_marked_dead_within_seconds(tiny_registered: str, rbee_env: Env,
                                                       hive_daemon: Daemon) -> None:
    rec = run("rbee-hive", "worker", "spawn", "cpu", "--model", "tiny", "--format",
              "json").json()
    os.kill(rec["pid"], signal.SIGKILL)
    killed = time.monotonic()
    # nobody asks: the record on disk turns dead by the daemon's own watching
    dead = wait_until("the record to say dead", lambda: record_on_disk(
        rbee_env.rbee_home, rec["id"])["state"] == "dead", timeout=5.0)
    took = time.monotonic() - killed
    assert dead and took < 3.0, took
    assert record_on_disk(rbee_env.rbee_home, rec["id"])["message"]
    wait_until("the zombie to be reaped", lambda: not Path(f"/proc/{rec['pid']}").exists(), 3)
    assert f"worker {rec['id']} is dead" in hive_daemon.log()


def test_reap_waits_for_a_child_that_is_still_exiting() -> None:
    from rbee_hive.daemon.service import reap

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    reap(child.pid)  # no wait: the child still runs, and is left alone
    assert Path(f"/proc/{child.pid}").exists()
    reap(child.pid, timeout=10)  # waits until it has exited, then collects it
    assert not Path(f"/proc/{child.pid}").exists()
    child.returncode = 0  # collected behind Popen's back: it must not look for it again
    reap(child.pid, timeout=10)  # collected already: nothing to wait for
    reap(os.getppid(), timeout=10)  # not our child: returns at once
    reap(None, timeout=10)  # a record with no pid yet


# the hive CLI while a daemon runs

def test_hive_commands_go_through_a_running_daemon_and_work_again_after_it_stops(
        tiny_registered: str, rbee_env: Env) -> None:
    d = start_daemon(rbee_env.rbee_home)
    try:
        rec = run("rbee-hive", "worker", "spawn", "cpu", "--model", "tiny", "--format",
                  "json").json()
        # the daemon started it (its child), and says so in its log
        assert ppid(rec["pid"]) == d.pid
        assert f"worker {rec['id']} started" in d.log()

        text = run("rbee-hive", "worker", "spawn", "cpu", "--model", "tiny", "--ctx", "256")
        assert text.returncode == 0, text
        assert "Loading tiny on cpu:0" in text.stderr and " ready " in text.stdout

        listed = run("rbee-hive", "worker", "list")
        assert listed.returncode == 0 and rec["id"] in listed.stdout
        lines = run("rbee-hive", "worker", "logs", rec["id"], "-n", "2")
        assert lines.returncode == 0 and f"as {rec['id']}" in lines.stdout
        follow = subprocess.Popen([str(Path(sys.executable).parent / "rbee-hive"), "worker",
                                   "logs", rec["id"], "-f", "-n", "1", "--format", "ndjson"],
                                  stdout=subprocess.PIPE, text=True)
        assert follow.stdout is not None
        first = json.loads(follow.stdout.readline())
        assert first["event"] == "line" and f"as {rec['id']}" in first["line"]
        verify = run("rbee-hive", "models", "verify", "tiny")
        assert verify.returncode == 0 and "Verifying" in verify.stderr

        stop = run("rbee-hive", "worker", "stop", rec["id"], "--format", "json")
        assert stop.returncode == 0 and stop.json()["id"] == rec["id"]
        assert follow.wait(timeout=10) == 0  # the followed log ends with its worker
        assert f"worker {rec['id']} stopped" in d.log()

        # errors keep their codes and exit codes through the daemon
        missing = run("rbee-hive", "worker", "stop", "cpu0-000000", "--format", "json")
        assert missing.returncode == 1 and error_of(missing)["code"] == "WORKER_NOT_FOUND"
        usage = run("rbee-hive", "models", "download", "tiny", "--sha256", "zz")
        assert usage.returncode == 2 and "USAGE" in usage.stderr
        assert "refused" not in d.log()
    finally:
        stop_daemon(rbee_env.rbee_home)

    after = run("rbee-hive", "worker", "spawn", "cpu", "--model", "tiny", "--ctx", "256",
                "--format", "json")
    assert after.returncode == 0, after
    assert after.json()["id"] not in d.log()  # done in the CLI's own process this time
    listed = run("rbee-hive", "worker", "list", "--format", "json").json()
    assert after.json()["id"] in [w["id"] for w in listed["workers"]]


def test_a_daemon_that_does_not_listen_is_passed_by(tiny_registered: str,
                                                     rbee_env: Env) -> None:
    # a state file whose pid lives (this test's) but whose address refuses connections: the
    # daemon is going away; the command runs here rather than failing
    home = rbee_env.rbee_home
    (home / "pool-daemon.token").write_text("x" * 40 + "\n")
    (home / "pool-daemon.json").write_text(json.dumps({
        "pid": os.getpid(), "url": "http://127.0.0.1:9", "local_url": "http://127.0.0.1:9",
        "port": 9, "bind": "127.0.0.1"}))
    r = run("rbee-hive", "models", "list", "--format", "json")
    assert r.returncode == 0, r
    assert [m["id"] for m in r.json()["models"]] == ["tiny"]


def test_concurrent_spawns_through_the_daemon_get_their_own_ports(tiny_registered: str,
                                                                  hive_daemon: Daemon) -> None:
    from concurrent.futures import ThreadPoolExecutor

    body = {"backend": "cpu", "model": "tiny", "ctx": 256, "wait": False}
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: hive_daemon.post("/v2/workers/start", body),
                                range(4)))
    assert [a.status_code for a in answers] == [200] * 4
    records = [a.json() for a in answers]
    assert len({r["port"] for r in records}) == 4 and len({r["id"] for r in records}) == 4
    stopped = hive_daemon.post("/v2/workers/stop", {"all": True, "timeout": 3}).json()
    assert len(stopped["stopped"]) == 4


def test_status_through_the_daemon_imports_no_heavy_library(tiny_registered: str,
                                                            hive_daemon: Daemon) -> None:
    code = ("import sys; from rbee_hive.ops import hive; h = hive(); doc = h.status(); "
            "print(type(h).__name__, doc['schema'], [m for m in ('llama_cpp', 'fastapi', "
            "'starlette', 'paramiko', 'httpx', 'huggingface_hub', 'pydantic', 'gguf', "
            "'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split(" ", 2)
    assert out[:2] == ["DaemonFirst", "rbee.hive.status/v1"] and out[2].strip() == "[]"


# heartbeats

@dataclass
class FakeQueen:
    """A tiny real HTTP server standing in for the queen: it records every heartbeat."""

    port: int
    beats: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    def start(self) -> FakeQueen:
        beats = self.beats

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                beats.append((time.monotonic(), self.headers.get("Authorization", ""),
                              {"path": self.path, **json.loads(body)}))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"ok": true}')

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def workers(self, beat: dict[str, Any]) -> list[tuple[str, str]]:
        return [(w["id"], w["state"]) for w in beat["status"]["workers"]]


@pytest.fixture
def fake_queen() -> Iterator[FakeQueen]:
    q = FakeQueen(free_port("127.0.0.1")).start()
    yield q
    q.stop()


def test_heartbeats_reach_the_queen_at_once_on_a_change_and_survive_it_going_down(
        tiny_registered: str, rbee_env: Env, fake_queen: FakeQueen) -> None:
    env = {"RBEE_QUEEN_URL": f"http://127.0.0.1:{fake_queen.port}",
           "RBEE_QUEEN_TOKEN": "the-queens-token-0123456789", "RBEE_HOST_NAME": "h9"}
    # a long period: every heartbeat after the first is one that a change sent at once
    d = start_daemon(rbee_env.rbee_home, "--heartbeat-interval", "60", env=env)
    try:
        wait_until("the first heartbeat", lambda: fake_queen.beats)
        _, auth, first = fake_queen.beats[0]
        assert auth == "Bearer the-queens-token-0123456789"
        assert first["path"] == "/v2/heartbeat" and first["host"] == "h9"
        assert first["status"]["schema"] == "rbee.hive.status/v1"
        assert first["daemon_url"] == d.url
        assert "RBEE_QUEEN_TOKEN" not in Path(f"/proc/{d.pid}/cmdline").read_text()

        rec = run("rbee-hive", "worker", "spawn", "cpu", "--model", "tiny", "--format",
                  "json").json()
        spawned = time.monotonic()
        beat = wait_until("a heartbeat with the new worker ready", lambda: next(
            (b for t, _, b in fake_queen.beats if (rec["id"], "ready") in fake_queen.workers(b)),
            None), timeout=5)
        assert beat["host"] == "h9"

        os.kill(rec["pid"], signal.SIGKILL)
        killed = time.monotonic()
        wait_until("a heartbeat with the worker dead", lambda: any(
            (rec["id"], "dead") in fake_queen.workers(b) for _, _, b in fake_queen.beats),
            timeout=5)
        assert time.monotonic() - killed < 4.0
        assert spawned < killed

        # the queen goes away: the daemon carries on, says so once, and keeps trying
        fake_queen.stop()
        run("rbee-hive", "worker", "stop", rec["id"])  # a change: a heartbeat is tried
        state = run("rbee-hive", "status", "--format", "json")
        assert state.returncode == 0 and state.json()["workers"] == []
        wait_until("the failure in the log", lambda: "heartbeat to the queen" in d.log())
        status = run("rbee-hive", "daemon", "status", "--format", "json").json()
        assert sorted(status["health"]["queen"]) == QUEEN_LINK
        assert status["health"]["queen"]["failed"] >= 1
        assert status["health"]["queen"]["last_error"]
        before = len(fake_queen.beats)
        fake_queen.start()
        run("rbee-hive", "worker", "spawn", "cpu", "--model", "tiny", "--ctx", "256")
        wait_until("heartbeats again", lambda: len(fake_queen.beats) > before, timeout=5)
        wait_until("the recovery in the log", lambda: "reach the queen" in d.log())
        assert d.log().count("heartbeat to the queen") == 1  # said once, not every time
    finally:
        stop_daemon(rbee_env.rbee_home)


# the controller's side, over real sshd hosts

@pytest.fixture
def ssh_daemons(ssh_pool: SshPool) -> Iterator[SshPool]:
    """The ssh pool; every pool daemon its hosts run is stopped after the test."""
    yield ssh_pool
    for h in ssh_pool.hosts:
        stop_daemon(h.rbee_home)


def daemon_start_on(host: SshHost, *args: str) -> dict[str, Any]:
    port = free_port(host.sshd.address)
    r = run("rbee", "pool", "daemon", "start", "--host", host.name, "--port", str(port), *args,
            "--format", "json")
    assert r.returncode == 0, r
    return dict(r.json())


def catalog_on_hub(rbee_env: Env, hub: HubServer, tiny_bytes: bytes) -> None:
    hub.add_repo_file(REPO, "tiny.gguf", tiny_bytes)
    (rbee_env.config / "catalog.toml").write_text(
        f'[[models]]\nid = "tiny"\nname = "Tiny"\nsource = "hf:{REPO}/tiny.gguf"\n')


@pytest.mark.ssh
def test_the_controller_uses_a_hosts_daemon_and_falls_back_to_ssh_when_it_stops(
        ssh_daemons: SshPool, rbee_env: Env, hub: HubServer, tiny_bytes: bytes) -> None:
    catalog_on_hub(rbee_env, hub, tiny_bytes)
    (h1,) = ssh_daemons.start(1)
    doc = daemon_start_on(h1)
    assert doc["schema"] == "rbee.hive.daemon/v1" and doc["running"] is True
    assert sorted(doc) == sorted([*DAEMON_DOC, "controller_url", "host", "reachable"])
    assert doc["bind"] == h1.sshd.address  # where this controller reaches the host's workers
    assert doc["controller_url"] == f"http://{h1.sshd.address}:{doc['port']}"
    assert doc["reachable"] is True
    known = rbee_env.config / "daemons.json"
    assert stat.S_IMODE(known.stat().st_mode) == 0o600
    entry = json.loads(known.read_text())["daemons"]["h1"]
    assert entry["url"] == doc["controller_url"]
    assert entry["token"] == (h1.rbee_home / "pool-daemon.token").read_text().strip()

    # no SSH from here on: status, download, spawn and the prompt all go through the daemon
    h1.sshd.stop()
    r = run("rbee", "pool", "status", "--format", "json")
    assert r.returncode == 0, r
    (host,) = r.json()["hosts"]
    assert host["ok"] and host["status"]["host"]["rbee_home"] == str(h1.rbee_home)
    check = run("rbee", "hosts", "check", "h1", "--format", "json")  # a preflight of SSH itself
    assert check.returncode == 1 and check.json()["hosts"][0]["error"]["code"] == \
        "HOST_UNREACHABLE"
    r = run("rbee", "infer", "--model", "tiny", "--prompt", "Hello", "--max-tokens", "5",
            "--format", "json")
    assert r.returncode == 0, r
    assert r.json()["text"] == "pqrst" and r.json()["placement"]["path"] == "cold"
    worker = r.json()["worker"]
    assert ppid(record_on_disk(h1.rbee_home, worker["id"])["pid"]) == doc["pid"]
    daemon_log = (h1.rbee_home / "pool-daemon.log").read_text()
    assert "model tiny present" in daemon_log and f"worker {worker['id']} ready" in daemon_log

    # the daemon stops on the host itself: the controller, which still knows it, uses SSH
    h1.sshd.start(ssh_daemons.lab.authorized)
    stop_daemon(h1.rbee_home)
    r = run("rbee", "pool", "status", "--format", "json")
    assert r.returncode == 0, r
    assert r.json()["hosts"][0]["status"]["workers"][0]["id"] == worker["id"]
    h1.sshd.stop()
    r = run("rbee", "pool", "status", "--format", "json")
    assert r.returncode == 1
    assert r.json()["hosts"][0]["error"]["code"] == "HOST_UNREACHABLE"  # it was SSH


@pytest.mark.ssh
def test_pool_daemon_stop_forgets_it_and_pool_commands_pass_through(
        ssh_daemons: SshPool, rbee_env: Env, tiny_model: Path) -> None:
    (h1,) = ssh_daemons.start(1)
    doc = daemon_start_on(h1)
    status = run("rbee", "pool", "daemon", "status", "--host", h1.name, "--format", "json")
    assert status.returncode == 0 and status.json()["pid"] == doc["pid"]
    # any other hive command still runs on the host, where it goes through the daemon
    imported = run("rbee", "pool", "models", "import", str(tiny_model), "--id", "tiny",
                   "--host", h1.name, "--format", "json")
    assert imported.returncode == 0, imported
    assert "model tiny imported" in (h1.rbee_home / "pool-daemon.log").read_text()

    stopped = run("rbee", "pool", "daemon", "stop", "--host", h1.name, "--format", "json")
    assert stopped.returncode == 0, stopped
    assert stopped.json()["running"] is False
    assert "h1" not in json.loads((rbee_env.config / "daemons.json").read_text())["daemons"]
    again = run("rbee", "pool", "daemon", "stop", "--host", h1.name, "--format", "json")
    assert again.returncode == 1 and error_of(again)["code"] == "DAEMON_NOT_RUNNING"
    fg = run("rbee", "pool", "daemon", "start", "--foreground", "--host", h1.name,
             "--format", "json")
    assert fg.returncode == 2 and error_of(fg)["code"] == "USAGE"


@pytest.mark.ssh
def test_a_daemon_started_from_the_controller_heartbeats_to_its_queen(
        ssh_daemons: SshPool, rbee_env: Env) -> None:
    (h1,) = ssh_daemons.start(1)
    qport = free_port("127.0.0.1")
    q = run("rbee", "queen", "start", "--port", str(qport), "--format", "json")
    assert q.returncode == 0, q
    try:
        qtoken = run("rbee", "queen", "token", "--format", "json").json()["token"]
        doc = daemon_start_on(h1, "--heartbeat-interval", "0.5")
        assert doc["queen_url"] == f"http://127.0.0.1:{qport}"
        environ = Path(f"/proc/{doc['pid']}/environ").read_bytes().split(b"\0")
        # the host holds a heartbeat token good for its own heartbeats, not the queen's own
        assert f"RBEE_QUEEN_TOKEN={heartbeat_token(qtoken, 'h1')}".encode() in environ
        assert qtoken.encode() not in Path(f"/proc/{doc['pid']}/environ").read_bytes()
        assert b"RBEE_HOST_NAME=h1" in environ
        assert qtoken.encode() not in Path(f"/proc/{doc['pid']}/cmdline").read_bytes()

        def h1_by_heartbeat() -> dict[str, Any] | None:
            st = httpx.get(f"http://127.0.0.1:{qport}/v2/state",
                           headers={"Authorization": f"Bearer {qtoken}"}).json()
            return next((h for h in st["hosts"] if h["name"] == "h1"
                         and h["source"] == "heartbeat" and h["ok"]), None)

        view = wait_until("the queen to see h1 by its heartbeats", h1_by_heartbeat, 15)
        assert view["status"]["host"]["rbee_home"] == str(h1.rbee_home)
        info = run("rbee", "pool", "daemon", "status", "--host", "h1", "--format", "json")
        assert info.json()["health"]["queen"]["sent"] >= 1
    finally:
        run("rbee", "queen", "stop")
