"""The JSON documents rbee-hive prints, built here so the CLI and the pool daemon serve the same.

One function per command: it does the command's work through the core modules and returns
its document, so the pool daemon can serve exactly what the CLI prints. Each imports what it
needs inside, so importing this module costs nothing on `rbee-hive status`'s path. Core
functions that already return a whole document are used as they are: status.status,
spawn.spawn (the worker record), workers.stop and gitops.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from rbee_common.errors import UsageError
from rbee_common.progress import Reporter, null_reporter
from rbee_hive import schemas

Doc = dict[str, Any]


def detect() -> Doc:
    """`rbee-hive detect`: backends and devices with their memory."""
    from rbee_hive.devices import detect as inventory

    return {"schema": schemas.DETECT, **inventory()}


def catalog() -> Doc:
    """`models catalog`: every catalog entry, and whether its file is on this host."""
    from rbee_common.catalog import load_catalog
    from rbee_hive.store import ModelStore, missing_files

    store = ModelStore()
    models = []
    for entry in load_catalog().values():
        record = store.get(entry.id)
        models.append({**entry.model_dump(), "downloaded": bool(
            record and record["source"] == str(entry.parsed_source())
            and not missing_files(record))})
    return {"schema": schemas.CATALOG, "models": models}


def models() -> Doc:
    """`models list`: the models registered on this host."""
    from rbee_hive.store import ModelStore

    return {"schema": schemas.MODELS, "models": ModelStore().list()}


def model_info(ref: str, ctx: int | None = None) -> Doc:
    """`models info`: what a reference means, its GGUF metadata and memory estimate.

    A file: source that is not registered is read where it lies, so its metadata and
    estimate show before it is imported.
    """
    from rbee_common.fit import default_ctx
    from rbee_common.ggufmeta import read_model_files
    from rbee_hive.spawn import model_estimate
    from rbee_hive.store import ModelStore, model_files, model_record

    spec, record = ModelStore().resolve(ref)
    doc: Doc = {"schema": schemas.MODEL, "id": spec.id, "name": spec.name,
                "source": str(spec.source), "downloaded": record is not None,
                "size": spec.size, "sha256": spec.sha256}
    if record is None and spec.source.kind == "file" and Path(spec.source.path).is_file():
        files = model_files(Path(spec.source.path))  # every file of a split model
        record = model_record(spec.id, spec.name, str(spec.source), [(p, "") for p in files],
                              read_model_files(files))
        record.pop("sha256")  # not hashed: a header read only
        record["shards"] = [{**f, "sha256": None} for f in record["shards"]]
    if record is not None:
        doc.update({k: v for k, v in record.items() if k != "added_at"})
        ctx = ctx or default_ctx(record["gguf"].get("context_length"))
        doc["estimate"] = model_estimate(record, ctx).to_dict()
    return doc


def download(ref: str, model_id: str | None = None, sha256: str | None = None,
             retries: int | None = None, report: Reporter = null_reporter) -> Doc:
    """`models download`: fetch (resumably), verify and register a model."""
    from rbee_hive.download import fetch, with_id
    from rbee_hive.store import ModelStore

    store = ModelStore()
    spec, _ = store.resolve(ref)
    if sha256 is not None:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise UsageError("--sha256 takes 64 lower-case hex digits")
        spec = dataclasses.replace(spec, sha256=sha256)
    record = fetch(with_id(spec, model_id), store, report, retries)
    return {"schema": schemas.MODEL, **record}


def import_model(path: Path, model_id: str | None = None, copy: bool = False,
                 report: Reporter = null_reporter) -> Doc:
    """`models import`: register a GGUF already on this host."""
    from rbee_hive.store import ModelStore

    record = ModelStore().import_file(path, model_id, copy, report)
    return {"schema": schemas.MODEL, **record}


def verify(model_id: str, report: Reporter = null_reporter) -> Doc:
    """`models verify`: re-check a model's header and sha256."""
    from rbee_hive.store import ModelStore

    return {"schema": schemas.VERIFY, **ModelStore().verify(model_id, report)}


def remove(model_id: str, force: bool = False) -> Doc:
    """`models rm`: unregister a model and delete its file (refused while a worker serves it)."""
    from rbee_hive.store import ModelStore
    from rbee_hive.workers import users_of

    result = ModelStore().remove(model_id, users_of(model_id), force)
    return {"schema": schemas.REMOVED, **result}


def workers() -> Doc:
    """`worker list`: the workers of this host with their live state."""
    from rbee_hive.workers import list_workers

    return {"schema": schemas.WORKERS, "workers": list_workers()}


def worker_health(wid: str) -> Doc:
    """`worker health`: one worker's /health document."""
    from rbee_hive.workers import health

    return {**health(wid), "schema": schemas.WORKER_HEALTH}


def worker_logs(wid: str, lines: int) -> Doc:
    """`worker logs` (not following): the last lines of a worker's log."""
    from rbee_hive.worker_logs import follow_log

    return {"schema": schemas.LOGS, "id": wid, "lines": list(follow_log(wid, lines, False))}


def stop_all(grace: float = 10.0) -> Doc:
    """`worker stop --all`: stop every worker of this host, then every RPC lender."""
    from rbee_hive.lenders import stop_all as stop_lenders
    from rbee_hive.workers import stop_all as stop_every

    return {"schema": schemas.STOPPED, "stopped": stop_every(grace) + stop_lenders(grace)}


def worker_token(wid: str) -> Doc:
    """`worker token`: a worker's bearer token."""
    from rbee_hive.workers import token

    return {"schema": schemas.TOKEN, "id": wid, "token": token(wid)}


def rpc_start(device: str, *, port: int | None = None, cache_dir: Path | None = None,
              bind: str | None = None, insecure: bool = False, threads: int | None = None,
              wait: bool = True, timeout: float | None = None,
              report: Reporter = null_reporter) -> Doc:
    """`rpc start`: a lender on one device, its record once it answers."""
    from rbee_hive.lenders import start

    return start(device, port=port, cache_dir=cache_dir, bind=bind, insecure=insecure,
                 threads=threads, wait=wait, timeout=timeout, report=report)


def rpc_list() -> Doc:
    """`rpc list`: the lenders of this host with their state and memory."""
    from rbee_hive.lenders import list_lenders

    return {"schema": schemas.LENDERS, "lenders": list_lenders()}


def rpc_logs(lid: str, lines: int) -> Doc:
    """`rpc logs` (not following): the last lines of a lender's log."""
    from rbee_hive.lenders import follow_log

    return {"schema": schemas.LOGS, "id": lid, "lines": list(follow_log(lid, lines, False))}


def rpc_stop(lid: str, grace: float = 10.0) -> Doc:
    """`rpc stop ID`: stop one lender."""
    from rbee_hive.lenders import stop

    return stop(lid, grace)


def rpc_stop_all(grace: float = 10.0) -> Doc:
    """`rpc stop --all`: stop every lender of this host."""
    from rbee_hive.lenders import stop_all as stop_lenders

    return {"schema": schemas.STOPPED, "stopped": stop_lenders(grace)}
