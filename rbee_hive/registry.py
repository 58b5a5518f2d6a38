"""The worker registry of one host: records, token and log paths, atomic saves, the lock.

Each worker has three files in $RBEE_HOME/workers: `<id>.json` (its record), `<id>.log`
(its stdout and stderr) and `<id>.token` (mode 0600). Records are written atomically, and
port choice plus record creation happen under one lock, so concurrent spawns on a host get
distinct ports. A record is written before its process starts (with "pid": null until the
process exists), so no worker runs without one.

A record that is not what rbee-hive writes (unparseable, a JSON list, keys missing or of the
wrong type) is never trusted and never fatal: it is set aside as `<id>.json.corrupt-<time>`,
named in a warning, and skipped; `worker stop ID` still ends such a worker and removes its
files (rbee_hive.workers).
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Any, ClassVar

from rbee_common.files import atomic_write_json, locked, read_json, set_aside
from rbee_common.paths import rbee_home
from rbee_hive.errors import WorkerNotFound

log = logging.getLogger("rbee.hive.registry")

WORKER_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
_MISSING = object()

# what every record holds, and of what type (bool is an int to Python: refused apart)
_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str,), "pid": (int, type(None)), "port": (int,), "host": (str,), "url": (str,),
    "backend": (str,), "device": (int, list), "model": (str,), "state": (str,),
}


def record_problem(wid: str, record: Any,
                   fields: dict[str, tuple[type, ...]] = _FIELDS) -> str | None:
    """Why a worker (or lender) record cannot be trusted; None when it can."""
    if not isinstance(record, dict):
        return f"is a JSON {type(record).__name__}, not an object"
    for field, kinds in fields.items():
        if field not in record:
            return f"has no {field!r}"
        value = record[field]
        if not isinstance(value, kinds) or isinstance(value, bool):
            return f"has a {field!r} of the wrong type ({type(value).__name__})"
    if record["id"] != wid:
        return f"says it is worker {record['id']!r}"
    if isinstance(record.get("device"), list) and not all(
            isinstance(d, int) and not isinstance(d, bool) for d in record["device"]):
        return "has a 'device' list that is not all integers"
    return None


class Registry:
    """The workers' records ($RBEE_HOME/workers); LenderRegistry keeps lenders' alike."""

    subdir: ClassVar[str] = "workers"
    what: ClassVar[str] = "worker"
    fields: ClassVar[dict[str, tuple[type, ...]]] = _FIELDS
    not_found: ClassVar[type[WorkerNotFound]] = WorkerNotFound

    def __init__(self, home: Path | None = None) -> None:
        self.dir = (home or rbee_home()) / self.subdir
        self.lock_path = self.dir / ".lock"

    def lock(self) -> contextlib.AbstractContextManager[None]:
        return locked(self.lock_path)

    def record_path(self, wid: str) -> Path:
        return self.dir / f"{wid}.json"

    def log_path(self, wid: str) -> Path:
        return self.dir / f"{wid}.log"

    def token_path(self, wid: str) -> Path:
        return self.dir / f"{wid}.token"

    def _load(self, wid: str) -> dict[str, Any] | None:
        """The record of `wid` if it is there and whole; a damaged one is set aside."""
        path = self.record_path(wid)
        try:
            record = read_json(path, default=_MISSING)  # unparseable: set aside, warned
        except OSError as e:  # unreadable (permissions, I/O): skip it, do not fail
            log.warning("cannot read the %s record %s (%s); skipped it", self.what, path, e)
            return None
        if record is _MISSING:
            return None
        problem = record_problem(wid, record, self.fields)
        if problem is not None:
            aside = set_aside(path)
            command = "rpc" if self.what == "lender" else "worker"
            log.warning("the %s record %s %s: set it aside as %s; `rbee-hive %s stop %s` ends "
                        "that %s and removes its files", self.what, path, problem, aside,
                        command, wid, self.what)
            return None
        return record

    def all(self) -> list[dict[str, Any]]:
        """Every whole record of this host (damaged ones set aside and skipped)."""
        if not self.dir.is_dir():
            return []
        out = []
        for path in sorted(self.dir.glob("*.json")):
            if not WORKER_ID_RE.match(path.stem):
                continue  # not a name rbee-hive gives a record
            record = self._load(path.stem)
            if record is not None:
                out.append(record)
        return out

    def get(self, wid: str) -> dict[str, Any]:
        record = self._load(wid) if WORKER_ID_RE.fullmatch(wid) else None
        if record is None:
            raise self.not_found(f"no {self.what} {wid!r} on this host")
        return dict(record)

    def remains(self, wid: str) -> list[Path]:
        """Files a worker without a whole record left: token, log, set-aside records."""
        if not WORKER_ID_RE.fullmatch(wid):
            return []
        found = [p for p in (self.token_path(wid), self.log_path(wid)) if p.exists()]
        return found + sorted(self.dir.glob(f"{wid}.json.corrupt-*"))

    def orphan_ids(self) -> list[str]:
        """Ids that have files here but no whole record (their record was damaged)."""
        if not self.dir.is_dir():
            return []
        ids = set()
        for path in self.dir.iterdir():
            wid = path.name.split(".", 1)[0]
            if WORKER_ID_RE.fullmatch(wid) and not self.record_path(wid).exists():
                ids.add(wid)
        return sorted(ids)

    def save(self, record: dict[str, Any]) -> None:
        atomic_write_json(self.record_path(record["id"]), record)

    def update(self, wid: str, **fields: Any) -> dict[str, Any]:
        with self.lock():
            record = self.get(wid)
            record.update(fields)
            self.save(record)
        return record

    def remove(self, wid: str) -> None:
        """Delete every file of a worker, set-aside records included."""
        for path in (self.record_path(wid), self.token_path(wid), self.log_path(wid),
                     *self.remains(wid)):
            path.unlink(missing_ok=True)
