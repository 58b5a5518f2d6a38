"""Starting a worker: the admission check (rbee_common.fit), the process, waiting until ready."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from rbee_common.errors import Interrupted
from rbee_common.estimate import Estimate, estimate, human_bytes, max_ctx_that_fits
from rbee_common.files import atomic_write_bytes
from rbee_common.fit import Fit, Room, default_ctx, fit, holders, room_of
from rbee_common.progress import Reporter, null_reporter
from rbee_common.rpc import LenderInfo
from rbee_hive import schemas
from rbee_hive.devices import backend_reason, detect, require_devices
from rbee_hive.errors import (
    InsufficientRam,
    InsufficientVram,
    LenderBusy,
    LenderUnreachable,
    LoadingTimeout,
    NoFreePort,
    RbeeError,
    RpcProtocolMismatch,
    RpcUnavailable,
    WorkerCrashed,
    crashed_hint,
    disk_full,
    is_disk_full,
)
from rbee_hive.lenders import list_lenders
from rbee_hive.ports import pick_port, port_lock, reserve, reserved_ports
from rbee_hive.preamble import unless_acknowledged
from rbee_hive.process import cuda_devices_of, http_health, pid_alive, terminate
from rbee_hive.registry import Registry
from rbee_hive.store import ModelStore
from rbee_hive.worker_logs import log_tail, raise_if_exited
from worker.launch import worker_argv, worker_env

log = logging.getLogger("rbee.hive.spawn")

# how many ports a spawn tries when the one it picked is taken before its worker binds it
PORT_ATTEMPTS = 5


def load_timeout() -> float:
    from rbee_common.config import env_number

    return float(env_number("RBEE_LOAD_TIMEOUT", 120.0, minimum=0.1, integer=False))


def model_estimate(model: dict[str, Any], ctx: int) -> Estimate:
    """The memory a registered model needs at context size `ctx` (weights + KV + overhead)."""
    g = model["gguf"]
    return estimate(model["size"], g["data_offset"], g.get("kv_per_token"), ctx)


def _check_split(model: dict[str, Any], est: Estimate, rooms: list[Room]) -> Fit:
    """The fit rule across several GPUs of this host: every card must hold its share."""
    verdict = fit(est, rooms)
    if verdict.ok:
        return verdict
    raise InsufficientVram(
        f"{model['id']} at ctx {est.ctx} {verdict.reason()}; "
        + "; ".join(r.describe() for r in rooms),
        hint="Free a card (stop idle workers), use a smaller --ctx, or a smaller model or "
             "quantisation.",
        required_bytes=est.total_bytes, shares=list(verdict.shares),
        available_bytes=[r.available for r in rooms])


def _check_memory(model: dict[str, Any], est: Estimate, room: Room,
                  inventory: dict[str, Any], live: list[dict[str, Any]]) -> Fit:
    """The fit rule (rbee_common.fit) as admission: refuse with figures and what would fit."""
    verdict = fit(est, [room])
    if verdict.ok:
        return verdict
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


def spawn(backend: str, model_ref: str, *, device: int | Sequence[int] = 0,
          port: int | None = None, ctx: int | None = None, bind: str | None = None,
          wait: bool = True, timeout: float | None = None, token: str | None = None,
          threads: int | None = None, tensor_split: Sequence[float] | None = None,
          rpc: Sequence[str] = (), report: Reporter = null_reporter) -> dict[str, Any]:
    """Check, start and (unless wait=False) wait for a worker; return its record.

    Several devices (GPUs of this host) run one worker with llama.cpp's layer split: the fit
    rule applies across them, and each takes a share in proportion to what it has available
    unless `tensor_split` says otherwise. RPC lenders (`rpc`, HOST:PORT as this host reaches
    them) join the split, first: each is asked for its protocol version and free memory
    before anything starts, so one that is gone, busy or of another build is a coded error
    with no worker left behind."""
    from rbee_common.rpc import parse_endpoints
    from worker.launch import check_devices

    devices = [device] if isinstance(device, int) else list(device)
    rpc = parse_endpoints(",".join(rpc)) if rpc else []
    check_devices(backend, devices, tensor_split, len(rpc))  # first: a usage error
    timeout = timeout or load_timeout()  # a bad RBEE_LOAD_TIMEOUT refuses before any start
    model = ModelStore().require(model_ref)
    inventory = detect()
    devs = require_devices(inventory, backend, devices, "choose a backend")
    lenders = _ask_lenders(rpc, report)
    ctx = ctx or default_ctx(model["gguf"].get("context_length"))
    est = model_estimate(model, ctx)
    bind = bind or os.environ.get("RBEE_WORKER_BIND") or "127.0.0.1"
    token = token or secrets.token_urlsafe(32)
    started: list[str] = []  # the id of each worker started, as soon as its record exists
    try:
        record = _start_and_wait(model, est, devs, inventory, backend=backend, port=port,
                                 bind=bind, ctx=ctx, token=token, threads=threads,
                                 tensor_split=tensor_split, lenders=lenders, wait=wait,
                                 timeout=timeout, report=report, started=started)
        unless_acknowledged(lambda: _stop_quietly(record["id"]))
        return record
    except KeyboardInterrupt:  # Ctrl+C while it starts: the user wants no worker after all
        if not started:
            raise
        from rbee_hive.workers import stop

        wid, said = started[-1], "stopped it"
        with sigint_ignored():  # a second Ctrl+C (or the stdin watch's) must not cut it short
            try:
                stop(wid, grace=5.0)
            except RbeeError as e:  # gone already (a port retry removed it), or would not stop
                said = f"stopping it said: {e}"
        raise Interrupted(f"interrupted while worker {wid} loaded; {said}",
                          hint="Run the same command again to start one.",
                          worker_id=wid) from None


def _start_and_wait(model: dict[str, Any], est: Estimate, devs: list[dict[str, Any]],
                    inventory: dict[str, Any], *, backend: str, port: int | None, bind: str,
                    ctx: int, token: str, threads: int | None,
                    tensor_split: Sequence[float] | None, lenders: list[LenderInfo],
                    wait: bool, timeout: float, report: Reporter, started: list[str]
                    ) -> dict[str, Any]:
    """Start the worker and wait for it, on another port if one is taken meanwhile."""
    tried: set[int] = set()
    for attempt in range(1, PORT_ATTEMPTS + 1):
        record, proc = _start(model, est, devs, inventory, backend=backend, port=port,
                              bind=bind, ctx=ctx, token=token, threads=threads,
                              tensor_split=tensor_split, avoid=tried, lenders=lenders,
                              started=started)
        if not wait:
            return record
        try:
            return wait_ready(record, proc, timeout, report)
        except RbeeError as e:
            if e.code in RPC_CODES:  # a lender went away (or got busy) since we asked it
                reg = Registry()
                with reg.lock():
                    reg.remove(record["id"])
                raise
            # another program took the port between our choice and the worker's bind
            if e.code != NoFreePort.code or port is not None or attempt == PORT_ATTEMPTS:
                raise
            tried.add(record["port"])
            report({"event": "log", "message": f"Port {record['port']} was taken before "
                                               f"{record['id']} could listen on it; trying "
                                               "another"})
            reg = Registry()
            with reg.lock():
                reg.remove(record["id"])
            started.remove(record["id"])  # no longer a worker a Ctrl+C would have to stop
    raise AssertionError("unreachable")  # the loop returns or raises


def _stop_quietly(worker_id: str) -> None:
    """Stop a worker whose controller went away before it learnt of it (its log says so)."""
    from rbee_hive.workers import stop

    log.warning("worker %s was ready, but whoever asked for it went away first; stopping it",
                worker_id)
    with contextlib.suppress(RbeeError):
        stop(worker_id, grace=5.0)


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """Ctrl+C is ignored inside (in the main thread; elsewhere signals cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


RPC_CODES = frozenset({LenderUnreachable.code, LenderBusy.code, RpcProtocolMismatch.code,
                       RpcUnavailable.code})


def _ask_lenders(rpc: Sequence[str], report: Reporter) -> list[LenderInfo]:
    """Handshake every lender (version, free memory) before anything starts: llama.cpp's
    own client would abort the worker on one that does not answer."""
    if not rpc:
        return []
    from rbee_common.rpc import handshake
    from worker.launch import build_backends

    if not build_backends()["rpc"]:
        raise RpcUnavailable("this host's llama-cpp-python was built without RPC (no "
                             "libggml-rpc): it cannot borrow memory from --rpc lenders")
    out = []
    for endpoint in rpc:
        info = handshake(endpoint)
        report({"event": "log", "message": f"RPC lender {endpoint}: protocol "
                                           f"{'.'.join(map(str, info.version))}, "
                                           f"{human_bytes(info.free)} free"})
        out.append(info)
    return out


def _check_lent(model: dict[str, Any], est: Estimate, lenders: list[LenderInfo],
                rooms: list[Room]) -> Fit:
    """The fit rule across RPC lenders (their free memory as they report it) and this host's
    devices: every device must hold its share."""
    lent = [Room("rpc", i, info.free, 0) for i, info in enumerate(lenders)]
    verdict = fit(est, lent + rooms)
    if verdict.ok:
        return verdict
    names = [f"rpc:{info.endpoint}" for info in lenders] + [r.label for r in rooms]
    parts = "; ".join(f"{name} would hold {human_bytes(share)} of {human_bytes(room.available)}"
                      f" available" for name, room, share
                      in zip(names, verdict.rooms, verdict.shares, strict=True))
    cls = InsufficientVram if all(r.backend != "cpu" for r in rooms) else InsufficientRam
    raise cls(f"{model['id']} at ctx {est.ctx} needs {verdict.needs()}; split: {parts}",
              hint="Add another lender (--rpc), use a smaller --ctx, or a smaller model or "
                   "quantisation.",
              required_bytes=est.total_bytes, shares=list(verdict.shares),
              available_bytes=[r.available for r in verdict.rooms])


def _bytes_by_split(est: Estimate, tensor_split: Sequence[float] | None, verdict: Fit
                    ) -> tuple[int, ...]:
    """What each device holds: the fit rule's shares, or those of an explicit split."""
    if not tensor_split:
        return verdict.shares
    body, total = est.weights_bytes + est.kv_bytes, sum(tensor_split)
    return tuple(int(body * share / total) + est.overhead_bytes for share in tensor_split)


def split_of(names: list[str], shares: Sequence[float], device_bytes: Sequence[int]
             ) -> list[dict[str, Any]]:
    """A worker record's `split`: every device (RPC lenders first), its share and bytes."""
    total = sum(shares) or 1.0
    return [{"device": name, "share": round(share / total, 4), "bytes": int(size)}
            for name, share, size in zip(names, shares, device_bytes, strict=True)]


def _start(model: dict[str, Any], est: Estimate, devs: list[dict[str, Any]],
           inventory: dict[str, Any], *, backend: str, port: int | None,
           bind: str, ctx: int, token: str, threads: int | None,
           tensor_split: Sequence[float] | None, avoid: set[int],
           lenders: list[LenderInfo], started: list[str] | None = None
           ) -> tuple[dict[str, Any], subprocess.Popen[bytes]]:
    """Admit, choose a port and start one worker process; its record exists before it does."""
    reg = Registry()
    reg.dir.mkdir(parents=True, exist_ok=True)
    with reg.lock():
        live = [r for r in reg.all() if r["state"] in schemas.LIVE_STATES
                and (r["pid"] is None or pid_alive(r["pid"], r["id"]))]
        # what this host's RPC lenders hold is taken too, as placement counts it
        held = holders(live, list_lenders(inventory))
        if lenders:
            verdict = _check_lent(model, est, lenders, [room_of(d, held) for d in devs])
        elif len(devs) == 1:
            verdict = _check_memory(model, est, room_of(devs[0], held), inventory, held)
        else:
            verdict = _check_split(model, est, [room_of(d, held) for d in devs])
        devices = [int(d["index"]) for d in devs]
        rpc = [info.endpoint for info in lenders]
        split = list(tensor_split or verdict.tensor_split) if len(devs) + len(rpc) > 1 else []
        names = [f"rpc:{e}" for e in rpc] + [f"{backend}:{i}" for i in devices]
        with port_lock() as runtime:
            chosen = pick_port(port, bind, {r["port"] for r in live} | avoid
                               | reserved_ports(runtime))
            many = f"x{len(devices)}" if len(devices) > 1 else ""
            lent = f"-rpc{len(rpc)}" if rpc else ""
            wid = f"{backend}{devices[0]}{many}{lent}-{secrets.token_hex(3)}"
            url_host = socket.gethostname() if bind in ("0.0.0.0", "::") else bind
            record: dict[str, Any] = {
                "schema": schemas.WORKER, "id": wid, "pid": None, "port": chosen, "host": bind,
                "url": f"http://{url_host}:{chosen}" if ":" not in url_host
                else f"http://[{url_host}]:{chosen}",
                "backend": backend, "device": devices[0], "devices": devices,
                "device_bytes": list(verdict.shares[len(rpc):]), "tensor_split": split,
                "rpc": rpc, "split": split_of(names, split or [1.0],
                                              _bytes_by_split(est, tensor_split, verdict)),
                "model": model["id"],
                "model_path": model["path"], "ctx": ctx, "estimate_bytes": est.total_bytes,
                "state": schemas.LOADING, "message": None,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "log": str(reg.log_path(wid)),
            }
            # the record first, the process second: a signal that ends this process at any
            # point leaves no worker without a record (its pid is found by its id if need be)
            try:
                reg.save(record)
                if started is not None:
                    started.append(wid)
                atomic_write_bytes(reg.token_path(wid), token.encode(), mode=0o600)
            except OSError as e:
                reg.remove(wid)
                if is_disk_full(e):
                    raise disk_full(reg.dir, None, e) from e
                raise
            argv = worker_argv(model_path=model["path"], backend=backend, device=devices,
                               port=chosen, host=bind, worker_id=wid, ctx=ctx,
                               model_id=model["id"], threads=threads,
                               tensor_split=split or None, rpc=rpc)
            log.debug("spawning %s", shlex.join(argv))
            try:
                with open(reg.log_path(wid), "ab") as logf:
                    proc = subprocess.Popen(argv, env=worker_env(token, backend, devices),
                                            stdin=subprocess.DEVNULL, stdout=logf,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            close_fds=True, cwd=str(reg.dir))
            except OSError as e:
                reg.save({**record, "state": schemas.ERROR, "message": f"could not start: {e}"})
                raise WorkerCrashed(f"could not start the worker: {e}",
                                    hint=crashed_hint(wid)) from e
            record["pid"] = proc.pid
            reg.save(record)
            reserve(runtime, chosen, proc.pid, wid)
    return record, proc


def wait_ready(record: dict[str, Any], proc: subprocess.Popen[bytes] | None, timeout: float,
               report: Reporter = null_reporter) -> dict[str, Any]:
    """Poll the new worker's process and /health until it is ready, fails, or times out."""
    reg = Registry()
    wid = record["id"]
    phase = "load"
    report({"event": "phase", "phase": phase, "total": None,
            "message": f"Loading {record['model']} on {record['backend']}:{record['device']}"})
    started = time.monotonic()
    while True:
        raise_if_exited(reg, record, proc, lambda code, tail: WorkerCrashed(
            f"worker {wid} exited with status {code} while loading",
            hint=crashed_hint(wid), log_tail=tail))
        health = http_health(record["host"], record["port"], timeout=1.0)
        if health is not None and health.get("worker_id") != wid:
            health = None  # another program's server on the port: ours failed to bind it
        if health is not None and health.get("status") in (schemas.READY, schemas.BUSY):
            took = time.monotonic() - started
            report({"event": "done", "phase": phase,
                    "message": f"{wid} ready on {record['url']} in {took:.1f}s"})
            return reg.update(wid, state=schemas.READY, ready_s=round(took, 3))
        if time.monotonic() - started > timeout:
            terminate(record["pid"], wid, grace=5.0, cuda_devices=cuda_devices_of(record))
            tail = log_tail(reg.log_path(wid))
            reg.update(wid, state=schemas.ERROR, message=f"not ready after {timeout:.0f}s")
            raise LoadingTimeout(f"worker {wid} was not ready after {timeout:.0f}s; stopped it",
                                 log_tail=tail)
        time.sleep(0.05)
