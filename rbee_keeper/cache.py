"""Workers this controller knows, with their tokens: how a warm `rbee infer` skips SSH.

Kept in $RBEE_CONFIG_DIR/workers.json, mode 0600 (it holds bearer tokens). An entry is
only a hint: it is checked with GET /health before use and dropped when stale.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rbee_common.files import atomic_write_json, locked, read_json, set_aside
from rbee_common.paths import config_dir

SCHEMA = "rbee.keeper.workers/v1"
log = logging.getLogger("rbee.keeper.cache")


@dataclass(frozen=True)
class KnownWorker:
    host: str
    id: str
    url: str
    token: str
    model: str
    backend: str
    device: int
    ctx: int
    ref: str = ""  # the reference it was started for (`--model`), so a warm hit needs no catalog
    added_at: float = 0.0
    devices: tuple[int, ...] = ()  # every device it uses, when it spans several


def cache_path() -> Path:
    return config_dir() / "workers.json"


def load() -> list[KnownWorker]:
    """The known workers; a damaged file is set aside (named in a warning), a damaged entry
    skipped: it is only a hint, never worth failing a command over."""
    path = cache_path()
    doc = read_json(path, default={}) or {}
    workers = doc.get("workers") if isinstance(doc, dict) else None
    if not isinstance(workers, list):
        if path.exists():
            aside = set_aside(path)
            log.warning("%s is not a worker list; set it aside as %s", path, aside)
        return []
    out = []
    for w in workers:
        try:
            out.append(KnownWorker(**{**w, "devices": tuple(w.get("devices") or ())}))
        except (TypeError, AttributeError):
            continue  # damaged, or from another version: ignore it
    return out


def _save(workers: list[KnownWorker]) -> None:
    atomic_write_json(cache_path(), {"schema": SCHEMA, "workers": [asdict(w) for w in workers]},
                      mode=0o600)


def remember(worker: KnownWorker) -> None:
    with locked(cache_path().with_suffix(".lock")):
        rest = [w for w in load() if w.id != worker.id or w.host != worker.host]
        _save([*rest, KnownWorker(**{**asdict(worker), "added_at": time.time()})])


def forget(worker_id: str, host: str | None = None) -> None:
    with locked(cache_path().with_suffix(".lock")):
        workers = load()
        keep = [w for w in workers if not (w.id == worker_id and host in (None, w.host))]
        if len(keep) != len(workers):
            _save(keep)


def matching(ref: str, hosts: set[str], backend: str | None,
             devices: tuple[int, ...] | None, ctx: int | None) -> list[KnownWorker]:
    """Known workers for a model reference (its id, or the reference they were started for)."""
    return [w for w in load()
            if ref in (w.model, w.ref) and w.host in hosts
            and (backend is None or w.backend == backend)
            and (devices is None or tuple(w.devices or (w.device,)) == devices)
            and (ctx is None or w.ctx >= ctx)]
