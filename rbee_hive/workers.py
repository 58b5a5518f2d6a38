"""Worker lifecycle on one host: spawn, list, health, logs, stop.

Each worker has three files in $RBEE_HOME/workers: `<id>.json` (its record), `<id>.log`
(its stdout and stderr) and `<id>.token` (mode 0600). Records are written atomically, and
port choice plus record creation happen under one lock, so concurrent spawns on a host get
distinct ports.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rbee_common.errors import RbeeError, RemoteError
from rbee_common.estimate import Estimate, estimate, max_ctx_that_fits
from rbee_common.files import atomic_write_bytes, atomic_write_json, locked, read_json
from rbee_common.fit import Room, default_ctx, fit, room_of
from rbee_common.http import get_health
from rbee_common.paths import rbee_home
from rbee_common.progress import Reporter, null_reporter
from rbee_hive import schemas
from rbee_hive.devices import backend_reason, detect, find_device
from rbee_hive.errors import (
    InsufficientRam,
    InsufficientVram,
    LoadingTimeout,
    NoFreePort,
    WorkerCrashed,
    WorkerNotFound,
)
from rbee_hive.store import ModelStore
from worker.errors import BackendUnavailable
from worker.launch import worker_argv, worker_env
from worker.protocol import ERROR_LINE_PREFIX

log = logging.getLogger("rbee.hive.workers")

PORT_RANGE = (8001, 8999)
WORKER_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


def load_timeout() -> float:
    return float(os.environ.get("RBEE_LOAD_TIMEOUT", "120"))


class Registry:
    def __init__(self, home: Path | None = None) -> None:
        self.dir = (home or rbee_home()) / "workers"
        self.lock_path = self.dir / ".lock"

    def lock(self) -> contextlib.AbstractContextManager[None]:
        return locked(self.lock_path)

    def record_path(self, wid: str) -> Path:
        return self.dir / f"{wid}.json"

    def log_path(self, wid: str) -> Path:
        return self.dir / f"{wid}.log"

    def token_path(self, wid: str) -> Path:
        return self.dir / f"{wid}.token"

    def all(self) -> list[dict[str, Any]]:
        if not self.dir.is_dir():
            return []
        out = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                log.warning("skipping unreadable worker record %s", path)
        return out

    def get(self, wid: str) -> dict[str, Any]:
        record = read_json(self.record_path(wid)) if WORKER_ID_RE.match(wid) else None
        if record is None:
            raise WorkerNotFound(f"no worker {wid!r} on this host")
        return dict(record)

    def save(self, record: dict[str, Any]) -> None:
        atomic_write_json(self.record_path(record["id"]), record)

    def update(self, wid: str, **fields: Any) -> dict[str, Any]:
        with self.lock():
            record = self.get(wid)
            record.update(fields)
            self.save(record)
        return record

    def remove(self, wid: str) -> None:
        for path in (self.record_path(wid), self.token_path(wid), self.log_path(wid)):
            path.unlink(missing_ok=True)


def pid_alive(pid: int, wid: str) -> bool:
    """Is this worker's process running? Zombies and reused pids count as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():
        return True  # no procfs (macOS): trust kill(0)
    try:
        if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
        return wid.encode() in (proc / "cmdline").read_bytes()
    except (OSError, IndexError):
        return False


def _probe_host(bind: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(bind, bind)


def http_health(host: str, port: int, timeout: float = 1.0) -> dict[str, Any] | None:
    """GET /health with the standard library: status must not pay for an HTTP client import."""
    probe = _probe_host(host)
    return get_health(f"http://[{probe}]:{port}" if ":" in probe else f"http://{probe}:{port}",
                      timeout)


def log_tail(path: Path, lines: int = 20) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - 64 * 1024, 0))
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    return text.splitlines()[-lines:]


def error_from_log(path: Path) -> RbeeError | None:
    """The structured error a worker writes as its last words, if it wrote one."""
    tail = log_tail(path, 200)
    for line in reversed(tail):
        if line.startswith(ERROR_LINE_PREFIX):
            try:
                err = json.loads(line[len(ERROR_LINE_PREFIX):])
            except ValueError:
                break
            details = {**(err.get("details") or {}), "log_tail": tail[-20:]}
            return RemoteError(str(err.get("code")), str(err.get("message")),
                               hint=str(err.get("hint") or ""), **details)
    return None


def model_estimate(model: dict[str, Any], ctx: int) -> Estimate:
    g = model["gguf"]
    return estimate(model["size"], g["data_offset"], g.get("kv_per_token"), ctx)


def _check_memory(model: dict[str, Any], est: Estimate, room: Room,
                  inventory: dict[str, Any], live: list[dict[str, Any]]) -> None:
    """The fit rule (rbee_common.fit) as admission: refuse with figures and what would fit."""
    verdict = fit(est, [room])
    if verdict.ok:
        return
    available = room.available or 0
    g = model["gguf"]
    suggestions = []
    fits_ctx = max_ctx_that_fits(model["size"], g["data_offset"], g.get("kv_per_token"),
                                 available)
    fits_ctx = min(fits_ctx, g.get("context_length") or fits_ctx)
    if 256 <= fits_ctx < est.ctx:
        suggestions.append(f"--ctx {fits_ctx // 256 * 256}")
    for d in inventory["devices"]:
        if (d["backend"], d["index"]) == (room.backend, room.index) \
                or backend_reason(inventory, d["backend"]) is not None:
            continue
        if fit(est, [room_of(d, live, room.reserve)]).ok:
            suggestions.append(f"{d['backend']} --device {d['index']}")
    suggestions.append("a smaller model or quantisation")
    cls = InsufficientVram if verdict.gpu else InsufficientRam
    what = "VRAM" if verdict.gpu else "RAM"
    raise cls(
        f"{model['id']} at ctx {est.ctx} needs {verdict.needs()} of {what}; "
        f"{room.describe()}",
        hint="Try " + "; or ".join(suggestions) + ".",
        required_bytes=est.total_bytes, available_bytes=available, suggestions=suggestions,
    )


def _port_free(bind: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((bind, port))
        except OSError:
            return False
    return True


def _pick_port(wanted: int | None, bind: str, taken: set[int]) -> int:
    if wanted is not None:
        if wanted in taken or not _port_free(bind, wanted):
            raise NoFreePort(f"port {wanted} on {bind} is in use",
                             hint="Leave out --port to let rbee-hive pick a free one.")
        return wanted
    low, high = PORT_RANGE
    for port in range(low, high + 1):
        if port not in taken and _port_free(bind, port):
            return port
    raise NoFreePort(f"no free port in {low}–{high} on {bind}")


def spawn(backend: str, model_ref: str, *, device: int = 0, port: int | None = None,
          ctx: int | None = None, bind: str | None = None, wait: bool = True,
          timeout: float | None = None, token: str | None = None, threads: int | None = None,
          report: Reporter = null_reporter) -> dict[str, Any]:
    """Check, start and (unless wait=False) wait for a worker; return its record."""
    model = ModelStore().require(model_ref)
    inventory = detect()
    reason = backend_reason(inventory, backend)
    if reason is not None:
        hint = None if "built without" in reason else (
            "See `rbee-hive detect`; choose a backend it lists as available.")
        raise BackendUnavailable(f"backend {backend!r} is not available on this host: {reason}",
                                 hint=hint)
    dev = find_device(inventory, backend, device)
    if dev is None:
        have = ", ".join(f"{d['backend']}:{d['index']}" for d in inventory["devices"])
        raise BackendUnavailable(f"there is no {backend} device {device} on this host",
                                 hint=f"Devices here: {have}.")
    ctx = ctx or default_ctx(model["gguf"].get("context_length"))
    est = model_estimate(model, ctx)
    bind = bind or os.environ.get("RBEE_WORKER_BIND") or "127.0.0.1"
    token = token or secrets.token_urlsafe(32)
    reg = Registry()
    reg.dir.mkdir(parents=True, exist_ok=True)
    with reg.lock():
        live = [r for r in reg.all()
                if r["state"] in schemas.LIVE_STATES and pid_alive(r["pid"], r["id"])]
        _check_memory(model, est, room_of(dev, live), inventory, live)
        port = _pick_port(port, bind, {r["port"] for r in live})
        wid = f"{backend}{device}-{secrets.token_hex(3)}"
        atomic_write_bytes(reg.token_path(wid), token.encode(), mode=0o600)
        argv = worker_argv(model_path=model["path"], backend=backend, device=device, port=port,
                           host=bind, worker_id=wid, ctx=ctx, model_id=model["id"],
                           threads=threads)
        log.debug("spawning %s", shlex.join(argv))
        with open(reg.log_path(wid), "ab") as logf:
            proc = subprocess.Popen(argv, env=worker_env(token, backend, device),
                                    stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    close_fds=True, cwd=str(reg.dir))
        url_host = socket.gethostname() if bind in ("0.0.0.0", "::") else bind
        record = {
            "schema": schemas.WORKER, "id": wid, "pid": proc.pid, "port": port, "host": bind,
            "url": f"http://{url_host}:{port}" if ":" not in url_host
            else f"http://[{url_host}]:{port}",
            "backend": backend, "device": device, "model": model["id"],
            "model_path": model["path"], "ctx": ctx, "estimate_bytes": est.total_bytes,
            "state": schemas.LOADING, "message": None,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "log": str(reg.log_path(wid)),
        }
        reg.save(record)
    if not wait:
        return record
    return wait_ready(record, proc, timeout or load_timeout(), report)


def wait_ready(record: dict[str, Any], proc: subprocess.Popen[bytes] | None, timeout: float,
               report: Reporter = null_reporter) -> dict[str, Any]:
    reg = Registry()
    wid = record["id"]
    phase = "load"
    report({"event": "phase", "phase": phase, "total": None,
            "message": f"Loading {record['model']} on {record['backend']}:{record['device']}"})
    started = time.monotonic()
    while True:
        code = proc.poll() if proc is not None else (
            None if pid_alive(record["pid"], wid) else -1)
        if code is not None:
            err = error_from_log(reg.log_path(wid)) or WorkerCrashed(
                f"worker {wid} exited with status {code} while loading",
                log_tail=log_tail(reg.log_path(wid)))
            reg.update(wid, state=schemas.ERROR, message=err.message, exit_code=code)
            raise err
        health = http_health(record["host"], record["port"], timeout=1.0)
        if health is not None and health.get("status") in (schemas.READY, schemas.BUSY):
            took = time.monotonic() - started
            report({"event": "done", "phase": phase,
                    "message": f"{wid} ready on {record['url']} in {took:.1f}s"})
            return reg.update(wid, state=schemas.READY, ready_s=round(took, 3))
        if time.monotonic() - started > timeout:
            _terminate(record["pid"], wid, grace=5.0)
            tail = log_tail(reg.log_path(wid))
            reg.update(wid, state=schemas.ERROR, message=f"not ready after {timeout:.0f}s")
            raise LoadingTimeout(f"worker {wid} was not ready after {timeout:.0f}s; stopped it",
                                 log_tail=tail)
        time.sleep(0.05)


def _refresh(reg: Registry, record: dict[str, Any]) -> dict[str, Any]:
    """A record with its state as it is now (pid and /health), persisted if it changed."""
    if record["state"] not in schemas.LIVE_STATES:
        return {**record, "log_tail": log_tail(reg.log_path(record["id"]), 10)}
    wid = record["id"]
    if not pid_alive(record["pid"], wid):
        err = error_from_log(reg.log_path(wid))
        message = err.message if err else "the worker process is gone"
        with contextlib.suppress(WorkerNotFound):
            reg.update(wid, state=schemas.DEAD, message=message)
        return {**record, "state": schemas.DEAD, "message": message,
                "log_tail": log_tail(reg.log_path(wid), 10)}
    health = http_health(record["host"], record["port"], timeout=1.0)
    if health is None:
        if record["state"] == schemas.LOADING:
            return record  # not listening yet
        return {**record, "state": schemas.ERROR, "message": "not answering /health",
                "log_tail": log_tail(reg.log_path(wid), 10)}
    state = str(health.get("status"))
    if state != record["state"] and state in (schemas.READY, schemas.LOADING):
        with contextlib.suppress(WorkerNotFound):
            reg.update(wid, state=state)
    return {**record, "state": state}


def list_workers() -> list[dict[str, Any]]:
    reg = Registry()
    records = reg.all()
    if len(records) <= 1:
        return [_refresh(reg, r) for r in records]
    with ThreadPoolExecutor(max_workers=min(16, len(records))) as pool:
        return list(pool.map(lambda r: _refresh(reg, r), records))


def health(wid: str) -> dict[str, Any]:
    reg = Registry()
    record = reg.get(wid)
    if not pid_alive(record["pid"], wid):
        raise WorkerCrashed(f"worker {wid} is not running", log_tail=log_tail(reg.log_path(wid)))
    doc = http_health(record["host"], record["port"], timeout=2.0)
    if doc is None:
        raise WorkerCrashed(f"worker {wid} is running but not answering /health on "
                            f"{record['url']}", log_tail=log_tail(reg.log_path(wid)))
    return doc


def token(wid: str) -> str:
    reg = Registry()
    reg.get(wid)
    return reg.token_path(wid).read_text().strip()


def _terminate(pid: int, wid: str, grace: float) -> str | None:
    """SIGTERM the worker's process group, wait `grace` seconds, then SIGKILL."""
    if not pid_alive(pid, wid):
        return None
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return None
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            if not pid_alive(pid, wid):
                return sig.name
            time.sleep(0.05)
    return signal.SIGKILL.name


def stop(wid: str, grace: float = 10.0) -> dict[str, Any]:
    reg = Registry()
    record = reg.get(wid)
    used = _terminate(record["pid"], wid, grace)
    with reg.lock():
        reg.remove(wid)
    return {"schema": schemas.STOPPED, "id": wid, "was": record["state"], "signal": used,
            "model": record["model"]}


def stop_all(grace: float = 10.0) -> list[dict[str, Any]]:
    ids = [r["id"] for r in Registry().all()]
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(ids)))) as pool:
        return list(pool.map(lambda w: stop(w, grace), ids))


def follow_log(wid: str, lines: int, follow: bool) -> Iterator[str]:
    """The log's last lines, then (with follow) new lines until the worker exits."""
    reg = Registry()
    record = reg.get(wid)
    path = reg.log_path(wid)
    yield from log_tail(path, lines)
    if not follow:
        return
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        partial = b""
        while True:
            chunk = f.read()
            if chunk:
                partial += chunk
                *done, partial = partial.split(b"\n")
                for line in done:
                    yield line.decode("utf-8", errors="replace")
                continue
            if not pid_alive(record["pid"], wid):
                if partial:
                    yield partial.decode("utf-8", errors="replace")
                return
            time.sleep(0.2)


def users_of(model_id: str) -> list[str]:
    return [r["id"] for r in Registry().all()
            if r["model"] == model_id and r["state"] in schemas.LIVE_STATES
            and pid_alive(r["pid"], r["id"])]
