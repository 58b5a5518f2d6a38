"""The worker registry of one host: records, token and log paths, atomic saves, the lock.

Each worker has three files in $RBEE_HOME/workers: `<id>.json` (its record), `<id>.log`
(its stdout and stderr) and `<id>.token` (mode 0600). Records are written atomically, and
port choice plus record creation happen under one lock, so concurrent spawns on a host get
distinct ports.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from rbee_common.files import atomic_write_json, locked, read_json
from rbee_common.paths import rbee_home
from rbee_hive.errors import WorkerNotFound

log = logging.getLogger("rbee.hive.registry")

WORKER_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


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
