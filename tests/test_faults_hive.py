"""Faults and hostile input on one hive host, with real parts, bounded in time and count.

- a full disk: a real tmpfs of a few hundred KB mounted as RBEE_HOME (as root, as CI runs);
- damaged state: worker records and model indexes of every wrong shape;
- ports: two hives on one address, a port taken between choice and bind, a spawner killed
  at every moment around the start of its worker;
- secrets: what a worker's environment holds;
- the Hugging Face cache filled by the real `hf` CLI through the loopback hub, offline too.

Every case has a fixed count (parametrize lists, bounded retry loops) and every wait a
deadline; each test has a timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Env
from tests.helpers import BIN, error_of, popen, run
from tests.hubserver import COMMIT, HubServer

pytestmark = pytest.mark.timeout(90)

REPO = "rbee-test/Tiny-GGUF"
FILE = "tiny-q8.gguf"
HF_REF = f"hf:{REPO}/{FILE}"
PAGE = 4096


# ---------------------------------------------------------------- helpers


@pytest.fixture
def small_disk() -> Iterator[Callable[[Path, int], Path]]:
    """Mount a tmpfs of `size` bytes at a directory (unmounted after the test)."""
    mounted: list[Path] = []

    def mount(where: Path, size: int) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs to fill a disk ({r.stderr.strip()}); "
                        "these tests need root, as CI has")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def resize(where: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)


def fill(where: Path) -> None:
    """Write a filler file until the file system is full."""
    fd = os.open(where / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * PAGE)
    except OSError as e:
        assert e.errno == 28, e
    finally:
        os.close(fd)
    assert shutil.disk_usage(where).free == 0


def pages(n: int) -> int:
    return -(-n // PAGE) * PAGE


def worker_processes(workers_dir: Path) -> dict[str, int]:
    """{worker id: pid} of every running worker process of this state dir, read off /proc."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            args = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(f"/proc/{name}/cwd")
            state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"--worker-id" in args and cwd == str(workers_dir) and state != "Z":
            out[args[args.index(b"--worker-id") + 1].decode()] = int(name)
    return out


def kill_all(pids: Iterator[int] | list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)


def spawn_json(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    r = run("rbee-hive", "worker", "spawn", "cpu", "--model", "tiny", "--ctx", "512",
            "--threads", "1", *args, "--format", "json", env=env, timeout=60)
    assert r.returncode == 0, r
    return dict(r.json())


def models_json(env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    r = run("rbee-hive", "models", "list", "--format", "json", env=env)
    assert r.returncode == 0, r
    return list(r.json()["models"])


# ---------------------------------------------------------------- a full disk


def test_download_onto_a_full_disk_is_disk_full_and_resumes(
        hub: HubServer, rbee_env: Env, tiny_bytes: bytes,
        small_disk: Callable[[Path, int], Path]) -> None:
    home = small_disk(rbee_env.rbee_home, 300 * 1024)
    hub.add_repo_file(REPO, FILE, tiny_bytes)
    r = run("rbee-hive", "models", "download", HF_REF, "--format", "json")
    assert r.returncode == 1, r
    err = error_of(r)
    part = home / "downloads" / "tiny-q8.part"
    assert err["code"] == "DISK_FULL", err
    kept = part.stat().st_size
    assert 0 < kept < len(tiny_bytes)
    assert err["details"]["path"] == str(part)
    assert err["details"]["needed_bytes"] == len(tiny_bytes) - kept
    assert err["details"]["free_bytes"] == 0
    assert "rm" in err["hint"] and "resume" in err["hint"]
    assert models_json() == []

    resize(home, 2 * 1024 * 1024)  # the user frees space
    r = run("rbee-hive", "models", "download", HF_REF, "--format", "json")
    assert r.returncode == 0, r
    rec = r.json()
    assert (rec["resumed_from"], rec["transferred_bytes"]) == (kept, len(tiny_bytes) - kept)
    assert rec["sha256"] == hashlib.sha256(tiny_bytes).hexdigest()


def test_models_rm_frees_space_on_a_full_disk(
        rbee_env: Env, tiny_model: Path, small_disk: Callable[[Path, int], Path]) -> None:
    home = small_disk(rbee_env.rbee_home, 1024 * 1024)
    r = run("rbee-hive", "models", "import", str(tiny_model), "--id", "tiny", "--copy",
            "--format", "json")
    assert r.returncode == 0, r
    fill(home)
    r = run("rbee-hive", "models", "rm", "tiny", "--format", "json")
    assert r.returncode == 0, r
    assert r.json()["freed_bytes"] == tiny_model.stat().st_size
    assert shutil.disk_usage(home).free >= tiny_model.stat().st_size
    assert models_json() == []
    assert not (home / "models" / "tiny.gguf").exists()


def test_an_index_that_cannot_be_written_leaves_no_orphan_file(
        rbee_env: Env, tiny_model: Path, small_disk: Callable[[Path, int], Path]) -> None:
    # room for the model's bytes and not one page more: the index write is what fails
    home = small_disk(rbee_env.rbee_home, pages(tiny_model.stat().st_size))
    r = run("rbee-hive", "models", "import", str(tiny_model), "--id", "tiny", "--copy",
            "--format", "json")
    assert r.returncode == 1, r
    err = error_of(r)
    assert err["code"] == "DISK_FULL" and err["details"]["path"].endswith("index.json"), err
    assert err["details"]["needed_bytes"] > 0
    assert sorted(p.name for p in (home / "models").iterdir()) == [".index.lock"]
    assert shutil.disk_usage(home).free == pages(tiny_model.stat().st_size)


def test_a_download_whose_index_write_fails_keeps_its_bytes_for_the_next_run(
        hub: HubServer, rbee_env: Env, tiny_bytes: bytes,
        small_disk: Callable[[Path, int], Path]) -> None:
    # the .part and its one-page resume note fit; the index does not
    home = small_disk(rbee_env.rbee_home, pages(len(tiny_bytes)) + PAGE)
    hub.add_repo_file(REPO, FILE, tiny_bytes)
    r = run("rbee-hive", "models", "download", HF_REF, "--format", "json")
    assert r.returncode == 1, r
    assert error_of(r)["code"] == "DISK_FULL"
    assert not (home / "models" / "tiny-q8.gguf").exists()  # no file outside the index
    assert (home / "downloads" / "tiny-q8.part").stat().st_size == len(tiny_bytes)
    resize(home, 2 * 1024 * 1024)
    gets = len(hub.gets())
    r = run("rbee-hive", "models", "download", HF_REF, "--format", "json")
    assert r.returncode == 0, r
    assert r.json()["transferred_bytes"] == 0 and len(hub.gets()) == gets


def test_a_spawn_onto_a_full_disk_is_disk_full_and_leaves_nothing(
        tiny_registered: str, rbee_env: Env, small_disk: Callable[[Path, int], Path]) -> None:
    workers = small_disk(rbee_env.rbee_home / "workers", 64 * 1024)
    fill(workers)
    r = run("rbee-hive", "worker", "spawn", "cpu", "--model", "tiny", "--format", "json")
    assert r.returncode == 1, r
    err = error_of(r)
    assert err["code"] == "DISK_FULL" and err["details"]["path"] == str(workers), err
    assert sorted(p.name for p in workers.iterdir()) == [".lock", "filler"]
    assert not worker_processes(workers)


def test_a_discarded_partial_does_not_count_as_resumed(hub: HubServer, rbee_env: Env,
                                                       tiny_bytes: bytes) -> None:
    # a partial longer than the file (its resume note intact): not a prefix, so discarded
    hub.add_repo_file(REPO, FILE, tiny_bytes)
    dl = rbee_env.rbee_home / "downloads"
    dl.mkdir(parents=True)
    (dl / "tiny-q8.part").write_bytes(tiny_bytes + b"x" * 400)
    sha = hashlib.sha256(tiny_bytes).hexdigest()
    (dl / "tiny-q8.json").write_text(json.dumps(
        {"source": HF_REF, "validator": f'"{sha}"', "size": len(tiny_bytes)}))
    r = run("rbee-hive", "models", "download", HF_REF, "--format", "json")
    assert r.returncode == 0, r
    rec = r.json()
    assert (rec["resumed_from"], rec["transferred_bytes"]) == (0, len(tiny_bytes)), rec


# ---------------------------------------------------------------- damaged state

DAMAGED_RECORDS = {
    "truncated": b'{"id": "cpu0-bad001", "pid": 1',
    "not-utf8": b"\xff\xfe\x00garbage",
    "a-list": b"[1, 2, 3]",
    "null": b"null",
    "missing-keys": b'{"id": "cpu0-bad001", "state": "ready"}',
    "wrong-types": json.dumps({
        "schema": "rbee.hive.worker/v1", "id": "cpu0-bad001", "pid": "123", "port": "8001",
        "host": "127.0.0.1", "url": "http://127.0.0.1:8001", "backend": "cpu", "device": 0,
        "model": "tiny", "state": "ready"}).encode(),
    "another-id": json.dumps({
        "schema": "rbee.hive.worker/v1", "id": "../../etc", "pid": 1, "port": 8001,
        "host": "127.0.0.1", "url": "http://127.0.0.1:8001", "backend": "cpu", "device": 0,
        "model": "tiny", "state": "ready"}).encode(),
}


def write_damaged_records(workers: Path) -> list[str]:
    """One record of each damaged shape, with a token and a log; their worker ids."""
    workers.mkdir(parents=True, exist_ok=True)
    ids = []
    for i, body in enumerate(DAMAGED_RECORDS.values()):
        wid = f"cpu0-bad{i:03d}"
        (workers / f"{wid}.json").write_bytes(body)
        (workers / f"{wid}.token").write_text("t" * 32)
        (workers / f"{wid}.log").write_text("loading\n")
        ids.append(wid)
    return ids


@pytest.mark.parametrize("damage", sorted(DAMAGED_RECORDS))
def test_a_damaged_worker_record_is_set_aside_and_can_be_removed(
        rbee_env: Env, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    # the hostile-input matrix runs the hive's core in-process (fast); the CLI test below
    # shows the same through real commands
    from rbee_hive.workers import list_workers, stop, users_of

    workers = rbee_env.rbee_home / "workers"
    workers.mkdir(parents=True)
    (workers / "cpu0-bad001.json").write_bytes(DAMAGED_RECORDS[damage])
    (workers / "cpu0-bad001.token").write_text("t" * 32)
    (workers / "cpu0-bad001.log").write_text("loading\n")
    assert list_workers() == [] and users_of("tiny") == []
    (aside,) = workers.glob("cpu0-bad001.json.corrupt-*")
    assert aside.read_bytes() == DAMAGED_RECORDS[damage]  # kept as it was, for a look
    assert str(workers / "cpu0-bad001.json") in caplog.text and aside.name in caplog.text
    assert stop("cpu0-bad001", grace=1.0)["id"] == "cpu0-bad001"
    assert not list(workers.glob("cpu0-bad001*"))


def test_damaged_records_leave_status_list_and_stop_working(tiny_registered: str,
                                                            rbee_env: Env) -> None:
    rec = spawn_json()
    workers = rbee_env.rbee_home / "workers"
    damaged = write_damaged_records(workers)
    # the live worker's own record cut short too
    record = workers / f"{rec['id']}.json"
    record.write_bytes(record.read_bytes()[:40])
    try:
        r = run("rbee-hive", "status", "--format", "json")
        assert r.returncode == 0, r
        assert r.json()["workers"] == []
        assert str(record) in r.stderr and "set it aside" in r.stderr
        assert len(list(workers.glob("*.corrupt-*"))) == len(damaged) + 1
        # its pid is not trusted from a damaged record: the process is found by its id
        r = run("rbee-hive", "worker", "stop", rec["id"], "--format", "json")
        assert r.returncode == 0, r
        assert r.json()["signal"] == "SIGTERM" and not worker_processes(workers)
        r = run("rbee-hive", "worker", "stop", "--all", "--format", "json")
        assert r.returncode == 0, r
        assert sorted(s["id"] for s in r.json()["stopped"]) == damaged
        assert not [p for p in workers.iterdir() if not p.name.startswith(".")]
    finally:
        kill_all([rec["pid"]])


def _index_with(entry_edit: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def damage(index: Path) -> None:
        doc = json.loads(index.read_text())
        doc["models"]["bad"] = entry_edit(json.loads(json.dumps(doc["models"]["tiny"])))
        index.write_text(json.dumps(doc))
    return damage


def _without(key: str) -> Callable[[dict[str, Any]], Any]:
    def edit(entry: dict[str, Any]) -> Any:
        entry["id"] = "bad"
        del entry[key]
        return entry
    return edit


DAMAGED_INDEXES: dict[str, tuple[Callable[[Path], None], bool]] = {
    # name: (damage, whether the good entry "tiny" survives it)
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:60]), False),
    "null": (lambda p: p.write_text("null"), False),
    "a-list": (lambda p: p.write_text("[]"), False),
    "models-a-list": (lambda p: p.write_text('{"models": [1]}'), False),
    "entry-a-list": (_index_with(lambda e: [e]), True),
    "entry-missing-path": (_index_with(_without("path")), True),
    "entry-missing-gguf": (_index_with(_without("gguf")), True),
    "entry-size-a-string": (_index_with(lambda e: {**e, "id": "bad", "size": "big"}), True),
    "entry-under-another-id": (_index_with(lambda e: e), True),
}


@pytest.mark.parametrize("damage", sorted(DAMAGED_INDEXES))
def test_a_damaged_model_index_is_set_aside_and_never_fatal(
        rbee_env: Env, tiny_model: Path, damage: str,
        caplog: pytest.LogCaptureFixture) -> None:
    from rbee_hive.status import status
    from rbee_hive.store import ModelStore

    store = ModelStore()
    store.import_file(tiny_model, "tiny", copy=False)
    edit, tiny_survives = DAMAGED_INDEXES[damage]
    edit(store.index_path)
    before = store.index_path.read_bytes()
    assert [m["id"] for m in status()["models"]] == (["tiny"] if tiny_survives else [])
    (aside,) = store.dir.glob("index.json.corrupt-*")
    assert aside.read_bytes() == before and str(store.index_path) in caplog.text
    assert [m["id"] for m in store.list()] == (["tiny"] if tiny_survives else [])
    store.import_file(tiny_model, "again", copy=False)  # the store takes writes again
    assert len(list(store.dir.glob("index.json.corrupt-*"))) == 1  # the new index is whole


def test_a_damaged_index_does_not_stop_the_cli(tiny_registered: str, rbee_env: Env) -> None:
    index = rbee_env.rbee_home / "models" / "index.json"
    DAMAGED_INDEXES["entry-a-list"][0](index)
    r = run("rbee-hive", "status", "--format", "json")
    assert r.returncode == 0, r
    assert [m["id"] for m in r.json()["models"]] == ["tiny"]
    assert str(index) in r.stderr and "index.json.corrupt-" in r.stderr
    r = run("rbee-hive", "models", "rm", "tiny", "--format", "json")
    assert r.returncode == 0, r


# ---------------------------------------------------------------- ports


SPAWNS_PER_HIVE = 2


def test_two_hives_on_one_address_spawn_concurrently_without_losing_any(
        rbee_env: Env, tiny_model: Path) -> None:
    homes = [rbee_env.root / "hive-a", rbee_env.root / "hive-b"]
    for home in homes:
        r = run("rbee-hive", "models", "import", str(tiny_model), "--id", "tiny",
                env={"RBEE_HOME": str(home)})
        assert r.returncode == 0, r

    def spawn_in(home: Path) -> Any:
        return run("rbee-hive", "worker", "spawn", "cpu", "--model", "tiny", "--ctx", "512",
                   "--threads", "1", "--format", "json", env={"RBEE_HOME": str(home)},
                   timeout=60)

    try:
        with ThreadPoolExecutor(max_workers=len(homes) * SPAWNS_PER_HIVE) as pool:
            results = list(pool.map(spawn_in, homes * SPAWNS_PER_HIVE))
        failed = [r for r in results if r.returncode != 0]
        assert not failed, failed[0]
        ports = [r.json()["port"] for r in results]
        assert len(set(ports)) == len(homes) * SPAWNS_PER_HIVE
    finally:
        for home in homes:
            run("rbee-hive", "worker", "stop", "--all", env={"RBEE_HOME": str(home)})
            kill_all(list(worker_processes(home / "workers").values()))


def test_a_port_taken_before_the_worker_binds_it_is_retried_with_another(
        tiny_registered: str, rbee_env: Env) -> None:
    workers = rbee_env.rbee_home / "workers"
    proc = popen("rbee-hive", "worker", "spawn", "cpu", "--model", "tiny", "--ctx", "512",
                 "--threads", "1", "--format", "ndjson")
    squatter = socket.socket()
    try:
        deadline = time.monotonic() + 20
        while True:  # the record names the chosen port before the worker can listen on it
            records = [p for p in workers.glob("*.json")] if workers.is_dir() else []
            port = None
            for p in records:
                with_port = json.loads(p.read_text() or "{}")
                port = with_port.get("port")
            if port:
                break
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.002)
        squatter.bind(("127.0.0.1", port))  # another program takes it first
        squatter.listen(1)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, (out, err)
        events = [json.loads(line) for line in out.splitlines()]
        rec = events[-1]["result"]
        assert rec["port"] != port and rec["state"] == "ready"
        assert any(f"Port {port} was taken" in e.get("message", "") for e in events), events
        listed = run("rbee-hive", "worker", "list", "--format", "json").json()["workers"]
        assert [w["id"] for w in listed] == [rec["id"]]  # the failed attempt left nothing
    finally:
        squatter.close()
        if proc.poll() is None:
            proc.kill()


# the last one lands after the record is whole: it makes sure a worker did start
KILL_DELAYS_S = (0.0, 0.001, 0.004, 0.05)


def test_a_spawner_killed_around_the_start_leaves_no_worker_without_a_record(
        tiny_registered: str, rbee_env: Env) -> None:
    from rbee_hive.workers import list_workers, stop_all

    workers = rbee_env.rbee_home / "workers"
    workers.mkdir(parents=True, exist_ok=True)
    started = 0
    for delay in KILL_DELAYS_S:
        proc = popen("rbee-hive", "worker", "spawn", "cpu", "--model", "tiny", "--ctx", "512",
                     "--threads", "1", "--no-wait", "--format", "json")
        deadline = time.monotonic() + 20
        # the log file is opened just before the process starts: kill the spawner then
        while not any(p.suffix == ".log" for p in workers.iterdir()):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        until = time.perf_counter() + delay
        while time.perf_counter() < until:
            pass
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
        time.sleep(0.3)  # a child started before the kill finishes its exec
        running = worker_processes(workers)
        started += bool(running)
        try:
            listed = {w["id"]: w["pid"] for w in list_workers()}
            # (a worker that died meanwhile, say of a port another suite took, is not asked)
            alive = worker_processes(workers)
            assert {w: p for w, p in running.items() if w in alive} == \
                {w: listed.get(w) for w in running if w in alive}, (delay, running, listed)
            stop_all(grace=3.0)
            assert not worker_processes(workers), delay
            assert not [p for p in workers.iterdir() if not p.name.startswith(".")], delay
        finally:
            kill_all(list(running.values()))
            for p in workers.iterdir():
                if not p.name.startswith("."):
                    p.unlink()
    assert started, "no kill landed after the worker started: the test exercised nothing"


# ---------------------------------------------------------------- secrets and hints


def test_a_worker_inherits_no_secret_and_its_crash_hint_names_it(tiny_registered: str) -> None:
    secrets = {"HF_TOKEN": "hf_secret_token_value", "AWS_SECRET_ACCESS_KEY": "aws-secret",
               "SSH_AUTH_SOCK": "/tmp/ssh-agent.sock", "RBEE_QUEEN_TOKEN": "queen-secret",
               "GITHUB_TOKEN": "ghp_secret", "MY_APP_PASSWORD": "hunter2"}
    needed = {"OMP_NUM_THREADS": "1", "LC_ALL": "C.UTF-8", "GGML_SCHED_MAX_COPIES": "1",
              "RBEE_WORKER_THREADS": "1"}
    rec = spawn_json(env={**secrets, **needed})
    environ = dict(line.split("=", 1) for line in
                   Path(f"/proc/{rec['pid']}/environ").read_text().split("\0") if "=" in line)
    assert not set(secrets) & set(environ), sorted(environ)
    assert not any(v in environ.values() for v in secrets.values())
    assert {k: environ.get(k) for k in needed} == needed
    assert environ["PATH"] == os.environ["PATH"] and len(environ["RBEE_WORKER_TOKEN"]) >= 16

    # the hint after WORKER_CRASHED names the worker, not a placeholder
    os.killpg(rec["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while rec["id"] in worker_processes(Path(rec["log"]).parent):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = run("rbee-hive", "worker", "health", rec["id"], "--format", "json")
    err = error_of(r)
    assert err["code"] == "WORKER_CRASHED"
    assert f"rbee-hive worker logs {rec['id']}" in err["hint"] and " ID" not in err["hint"]


# ---------------------------------------------------------------- the Hugging Face cache


def hf(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real `hf` CLI of huggingface_hub."""
    return subprocess.run([str(BIN / "hf"), *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def hf_blob(rbee_env: Env, body: bytes) -> Path:
    return (rbee_env.root / "hf" / "hub" / "models--rbee-test--Tiny-GGUF" / "blobs"
            / hashlib.sha256(body).hexdigest())


def test_a_file_hf_downloaded_is_shared_not_fetched_again_and_serves_offline(
        hub: HubServer, rbee_env: Env, tiny_bytes: bytes) -> None:
    hub.add_repo_file(REPO, FILE, tiny_bytes)
    r = hf("download", REPO, FILE)
    assert r.returncode == 0, r.stderr
    gets = len(hub.gets())
    r = run("rbee-hive", "models", "download", HF_REF, "--format", "json")
    assert r.returncode == 0, r
    rec = r.json()
    assert len(hub.gets()) == gets and rec["transferred_bytes"] == 0  # no second transfer
    assert os.stat(rec["path"]).st_ino == hf_blob(rbee_env, tiny_bytes).stat().st_ino
    assert rec["revision"] == COMMIT and rec["sha256"] == hashlib.sha256(tiny_bytes).hexdigest()

    # offline, in a second state dir: the cache serves, the hub is never asked
    requests = len(hub.state.log)
    r = run("rbee-hive", "models", "download", HF_REF, "--format", "json",
            env={"HF_HUB_OFFLINE": "1", "RBEE_HOME": str(rbee_env.root / "other")})
    assert r.returncode == 0, r
    assert len(hub.state.log) == requests
    assert os.stat(r.json()["path"]).st_ino == hf_blob(rbee_env, tiny_bytes).stat().st_ino


def test_a_file_rbee_downloaded_is_in_the_cache_for_hf_offline(
        hub: HubServer, rbee_env: Env, tiny_bytes: bytes) -> None:
    hub.add_repo_file(REPO, FILE, tiny_bytes)
    r = run("rbee-hive", "models", "download", HF_REF, "--format", "json")
    assert r.returncode == 0, r
    path = Path(r.json()["path"])
    r = hf("download", REPO, FILE, env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    (line,) = [x for x in r.stdout.splitlines() if x.strip().startswith("path:")]
    served = Path(line.split("path:", 1)[1].strip())
    assert served.stat().st_ino == path.stat().st_ino  # one copy of the bytes
    assert len(hub.gets()) == 1


def test_offline_without_the_file_cached_says_so(hub: HubServer, rbee_env: Env) -> None:
    r = run("rbee-hive", "models", "download", HF_REF, "--format", "json",
            env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1, r
    err = error_of(r)
    assert err["code"] == "DOWNLOAD_FAILED" and "HF_HUB_OFFLINE" in err["message"]
    assert str(rbee_env.root / "hf" / "hub") in err["message"] and hub.state.log == []


def test_a_damaged_cache_blob_is_not_trusted(hub: HubServer, rbee_env: Env,
                                             tiny_bytes: bytes) -> None:
    hub.add_repo_file(REPO, FILE, tiny_bytes)
    assert hf("download", REPO, FILE).returncode == 0
    blob = hf_blob(rbee_env, tiny_bytes)
    damaged = bytearray(blob.read_bytes())
    damaged[-1] ^= 0xFF
    blob.write_bytes(bytes(damaged))
    r = run("rbee-hive", "models", "download", HF_REF, "--format", "json")
    assert r.returncode == 0, r
    rec = r.json()
    assert rec["transferred_bytes"] == len(tiny_bytes)
    assert Path(rec["path"]).read_bytes() == tiny_bytes
    assert "does not verify" in r.stderr
