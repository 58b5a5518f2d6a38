"""The workers of one host as they are now: list, health, token, stop, and who serves a model.

Starting a worker is rbee_hive.spawn's job; its records live in rbee_hive.registry.
"""

from __future__ import annotations

import calendar
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rbee_hive import schemas
from rbee_hive.errors import WorkerCrashed, WorkerNotFound, crashed_hint
from rbee_hive.process import cuda_devices_of, find_worker, http_health, pid_alive, terminate
from rbee_hive.registry import Registry
from rbee_hive.worker_logs import error_from_log, log_tail

# how long a record may say "pid": null before its start counts as cut short (the pid is
# written milliseconds after the record; a worker that did start is found by its id)
START_GRACE_S = 30.0


def _pid_of(reg: Registry, record: dict[str, Any]) -> int | None:
    """The worker's pid: from its record, or (a spawn cut short before it was written) found
    by its worker id, and then written into the record."""
    if record.get("pid") is not None:
        return int(record["pid"])
    pid = find_worker(record["id"], reg.dir)
    if pid is not None:
        with contextlib.suppress(WorkerNotFound):
            reg.update(record["id"], pid=pid)
    return pid


def _still_starting(record: dict[str, Any]) -> bool:
    """Could a record without a pid (and no process of its id) still be starting?"""
    try:
        created = calendar.timegm(time.strptime(str(record.get("created_at")),
                                                "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return False
    return time.time() - created < START_GRACE_S


def _refresh(reg: Registry, record: dict[str, Any]) -> dict[str, Any]:
    """A record with its state as it is now (pid and /health), persisted if it changed."""
    if record["state"] not in schemas.LIVE_STATES:
        return {**record, "log_tail": log_tail(reg.log_path(record["id"]), 10)}
    wid = record["id"]
    pid = _pid_of(reg, record)
    if pid is None and _still_starting(record):
        return record
    record = {**record, "pid": pid}
    if pid is None or not pid_alive(pid, wid):
        err = error_from_log(reg.log_path(wid))
        message = err.message if err else "the worker process is gone" if pid is not None \
            else "its start was cut short before the worker process ran"
        lost = _lost_lenders(record)
        if lost:
            message = "; ".join(f"its RPC lender {x['endpoint']} is gone ({x['reason']})"
                                for x in lost) + f" — {message}"
        with contextlib.suppress(WorkerNotFound):
            reg.update(wid, state=schemas.DEAD, message=message, lost_lenders=lost)
        return {**record, "state": schemas.DEAD, "message": message, "lost_lenders": lost,
                "log_tail": log_tail(reg.log_path(wid), 10)}
    health = http_health(record["host"], record["port"], timeout=1.0)
    if health is not None and health.get("worker_id") != wid:
        health = None  # the port answers for another worker, not this one
    if health is None:
        if record["state"] == schemas.LOADING:
            return record  # not listening yet
        return {**record, "state": schemas.ERROR, "message": "not answering /health",
                "log_tail": log_tail(reg.log_path(wid), 10)}
    state = str(health.get("status"))
    gone = _hung_up_lenders(record)
    if gone:  # llama.cpp would abort the worker on its next job
        return {**record, "state": schemas.ERROR,
                "message": f"its RPC lender {', '.join(gone)} is gone: the next job would end "
                           "this worker",
                "log_tail": log_tail(reg.log_path(wid), 10)}
    if state != record["state"] and state in (schemas.READY, schemas.LOADING):
        with contextlib.suppress(WorkerNotFound):
            reg.update(wid, state=state)
    return {**record, "state": state}


def _lost_lenders(record: dict[str, Any]) -> list[dict[str, str]]:
    """The RPC lenders of a dead worker that are gone too: a lender lost mid-generation
    makes llama.cpp abort its borrower, so that is what the crash is named after."""
    if not record.get("rpc"):
        return []
    from rbee_hive.lenders import lost_lenders

    return lost_lenders(record["rpc"])


def _hung_up_lenders(record: dict[str, Any]) -> list[str]:
    """A live worker's RPC lenders that have hung up on it (rbee_hive.lenders.hung_up)."""
    if not record.get("rpc"):
        return []
    from rbee_hive.lenders import hung_up

    return hung_up(record["rpc"])


def list_workers() -> list[dict[str, Any]]:
    """Every worker record of this host with its state refreshed (in parallel)."""
    reg = Registry()
    records = reg.all()
    if len(records) <= 1:
        return [_refresh(reg, r) for r in records]
    with ThreadPoolExecutor(max_workers=min(16, len(records))) as pool:
        return list(pool.map(lambda r: _refresh(reg, r), records))


def health(wid: str) -> dict[str, Any]:
    """The worker's own /health document; WORKER_CRASHED if it is gone or silent."""
    reg = Registry()
    record = reg.get(wid)
    pid = _pid_of(reg, record)
    if pid is None or not pid_alive(pid, wid):
        lost = record.get("lost_lenders") or _lost_lenders(record)
        gone = "".join(f"; its RPC lender {x['endpoint']} is gone" for x in lost)
        raise WorkerCrashed(f"worker {wid} is not running{gone}", hint=crashed_hint(wid),
                            log_tail=log_tail(reg.log_path(wid)), lost_lenders=lost or None)
    doc = http_health(record["host"], record["port"], timeout=2.0)
    if doc is not None and doc.get("worker_id") != wid:
        doc = None  # the port answers for another worker, not this one
    if doc is None:
        raise WorkerCrashed(f"worker {wid} is running but not answering /health on "
                            f"{record['url']}", hint=crashed_hint(wid),
                            log_tail=log_tail(reg.log_path(wid)))
    return doc


def token(wid: str) -> str:
    """The worker's bearer token."""
    reg = Registry()
    reg.get(wid)
    return reg.token_path(wid).read_text().strip()


def stop(wid: str, grace: float = 10.0) -> dict[str, Any]:
    """End the worker's process (SIGTERM, then SIGKILL after `grace`) and remove its files.

    A worker whose record is damaged is stopped too: its process is found by its worker id
    (a damaged record's pid is not trusted) and every file it left is removed.
    """
    reg = Registry()
    try:
        record = reg.get(wid)
    except WorkerNotFound:
        if not reg.remains(wid):
            raise
        pid = find_worker(wid, reg.dir)
        used = terminate(pid, wid, grace) if pid is not None else None
        with reg.lock():
            reg.remove(wid)
        return {"schema": schemas.STOPPED, "id": wid, "was": "damaged", "signal": used,
                "model": None}
    pid = _pid_of(reg, record)
    used = terminate(pid, wid, grace, cuda_devices_of(record)) if pid is not None else None
    with reg.lock():
        reg.remove(wid)
    return {"schema": schemas.STOPPED, "id": wid, "was": record["state"], "signal": used,
            "model": record["model"]}


def stop_all(grace: float = 10.0) -> list[dict[str, Any]]:
    """Stop every worker of this host, in parallel (those with damaged records too)."""
    reg = Registry()
    ids = [r["id"] for r in reg.all()] + reg.orphan_ids()
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(ids)))) as pool:
        return list(pool.map(lambda w: stop(w, grace), ids))


def users_of(model_id: str) -> list[str]:
    """Ids of the live workers serving `model_id`."""
    reg = Registry()
    out = []
    for r in reg.all():
        if r["model"] != model_id or r["state"] not in schemas.LIVE_STATES:
            continue
        pid = _pid_of(reg, r)
        if (pid is not None and pid_alive(pid, r["id"])) or (pid is None
                                                             and _still_starting(r)):
            out.append(r["id"])
    return out
