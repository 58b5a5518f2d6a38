"""The workers of one host as they are now: list, health, token, stop, and who serves a model.

Starting a worker is rbee_hive.spawn's job; its records live in rbee_hive.registry.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rbee_hive import schemas
from rbee_hive.errors import WorkerCrashed, WorkerNotFound
from rbee_hive.process import cuda_devices_of, http_health, pid_alive, terminate
from rbee_hive.registry import Registry
from rbee_hive.worker_logs import error_from_log, log_tail


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
    if not pid_alive(record["pid"], wid):
        raise WorkerCrashed(f"worker {wid} is not running", log_tail=log_tail(reg.log_path(wid)))
    doc = http_health(record["host"], record["port"], timeout=2.0)
    if doc is None:
        raise WorkerCrashed(f"worker {wid} is running but not answering /health on "
                            f"{record['url']}", log_tail=log_tail(reg.log_path(wid)))
    return doc


def token(wid: str) -> str:
    """The worker's bearer token."""
    reg = Registry()
    reg.get(wid)
    return reg.token_path(wid).read_text().strip()


def stop(wid: str, grace: float = 10.0) -> dict[str, Any]:
    """End the worker's process (SIGTERM, then SIGKILL after `grace`) and remove its files."""
    reg = Registry()
    record = reg.get(wid)
    used = terminate(record["pid"], wid, grace, cuda_devices_of(record))
    with reg.lock():
        reg.remove(wid)
    return {"schema": schemas.STOPPED, "id": wid, "was": record["state"], "signal": used,
            "model": record["model"]}


def stop_all(grace: float = 10.0) -> list[dict[str, Any]]:
    """Stop every worker of this host, in parallel."""
    ids = [r["id"] for r in Registry().all()]
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(ids)))) as pool:
        return list(pool.map(lambda w: stop(w, grace), ids))


def users_of(model_id: str) -> list[str]:
    """Ids of the live workers serving `model_id`."""
    return [r["id"] for r in Registry().all()
            if r["model"] == model_id and r["state"] in schemas.LIVE_STATES
            and pid_alive(r["pid"], r["id"])]
