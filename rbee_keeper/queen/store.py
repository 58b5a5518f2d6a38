"""The queen's state in SQLite (standard library, WAL, one file in the config dir, mode 0600
since it holds worker tokens): jobs with their request, state, placement, timings and text;
each job's events; the workers it started; the hosts' last state; per-model settings.

Every job transition is one committed transaction, written before the side effect it
announces, so a queen killed at any moment restarts to a true picture.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rbee_keeper.jobs import ACTIVE_STATES, InvalidTransition, JobState, check_transition

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    state TEXT NOT NULL,
    model TEXT NOT NULL,
    source TEXT NOT NULL,
    request TEXT NOT NULL,
    placement TEXT,
    host TEXT,
    worker TEXT,
    text TEXT NOT NULL DEFAULT '',
    tokens INTEGER NOT NULL DEFAULT 0,
    timings TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    event TEXT NOT NULL,
    data TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (job_id, seq)
);
CREATE TABLE IF NOT EXISTS workers (
    host TEXT NOT NULL,
    id TEXT NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (host, id)
);
CREATE TABLE IF NOT EXISTS hosts (
    name TEXT PRIMARY KEY,
    doc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS models (
    id TEXT PRIMARY KEY,
    ttl REAL
);
CREATE TABLE IF NOT EXISTS samples (
    at REAL NOT NULL,
    doc TEXT NOT NULL
);
"""

JOB_COLUMNS = ("id", "created", "updated", "state", "model", "source", "request", "placement",
               "host", "worker", "text", "tokens", "timings", "error")
JSON_COLUMNS = frozenset({"request", "placement", "timings", "error"})


def _row(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    for key in JSON_COLUMNS & set(out):
        out[key] = json.loads(out[key]) if out[key] else None
    return out


class Store:
    """One connection, shared by the queen's threads under a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        os.chmod(path, 0o600)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self, statements: Iterable[tuple[str, tuple[Any, ...]]],
            expect_first: int | None = None) -> None:
        """Run the statements in one transaction; with `expect_first`, roll back unless the
        first one changed exactly that many rows."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for i, (sql, args) in enumerate(statements):
                    changed = self._db.execute(sql, args).rowcount
                    if i == 0 and expect_first is not None and changed != expect_first:
                        raise InvalidTransition(f"{sql.split()[0]} changed {changed} rows, "
                                                f"not {expect_first}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, args))

    # jobs

    def add_job(self, job_id: str, model: str, source: str, request: dict[str, Any],
                event: tuple[int, str, dict[str, Any]]) -> None:
        now = time.time()
        seq, name, data = event
        self._tx([
            ("INSERT INTO jobs (id, created, updated, state, model, source, request) "
             "VALUES (?, ?, ?, ?, ?, ?, ?)",
             (job_id, now, now, JobState.queued.value, model, source, json.dumps(request))),
            ("INSERT INTO events VALUES (?, ?, ?, ?, ?)",
             (job_id, seq, name, json.dumps(data), now)),
        ])

    def transition(self, job_id: str, current: JobState, new: JobState,
                   events: Iterable[tuple[int, str, dict[str, Any]]] = (),
                   **fields: Any) -> None:
        """Move a job to `new` (checked against the state machine), with its events, at once."""
        check_transition(current, new)
        now = time.time()
        sets = ["state = ?", "updated = ?"]
        args: list[Any] = [new.value, now]
        for key, value in fields.items():
            if key not in JOB_COLUMNS:
                raise KeyError(key)
            sets.append(f"{key} = ?")
            args.append(json.dumps(value) if key in JSON_COLUMNS else value)
        statements = [(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ? AND state = ?",
                       (*args, job_id, current.value))]
        statements += [("INSERT INTO events VALUES (?, ?, ?, ?, ?)",
                        (job_id, seq, name, json.dumps(data), now))
                       for seq, name, data in events]
        self._tx(statements, expect_first=1)  # another thread moved it first: a bug

    def save_progress(self, job_id: str, events: Iterable[tuple[int, str, dict[str, Any]]],
                      text: str, tokens: int) -> None:
        """What a running job has streamed so far (its new token events, its text), at once:
        a queen killed mid-job restarts with it on record."""
        now = time.time()
        self._tx([("UPDATE jobs SET text = ?, tokens = ?, updated = ? WHERE id = ?",
                   (text, tokens, now, job_id)),
                  *(("INSERT INTO events VALUES (?, ?, ?, ?, ?)",
                     (job_id, seq, name, json.dumps(data), now)) for seq, name, data in events)])

    def add_events(self, job_id: str, events: Iterable[tuple[int, str, dict[str, Any]]]) -> None:
        now = time.time()
        self._tx([("INSERT INTO events VALUES (?, ?, ?, ?, ?)",
                   (job_id, seq, name, json.dumps(data), now)) for seq, name, data in events])

    def job(self, job_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _row(rows[0]) if rows else None

    def jobs(self, states: Iterable[str] | None = None, model: str | None = None,
             limit: int = 100, before: float | None = None) -> list[dict[str, Any]]:
        where, args = [], []
        if states:
            states = list(states)
            where.append(f"state IN ({', '.join('?' for _ in states)})")
            args += states
        if model:
            where.append("model = ?")
            args.append(model)
        if before is not None:
            where.append("created < ?")
            args.append(before)
        sql = "SELECT * FROM jobs" + (f" WHERE {' AND '.join(where)}" if where else "")
        sql += " ORDER BY created DESC LIMIT ?"
        return [_row(r) for r in self._query(sql, (*args, limit))]

    def events(self, job_id: str, after: int = -1) -> list[tuple[int, str, dict[str, Any]]]:
        rows = self._query("SELECT seq, event, data FROM events WHERE job_id = ? AND seq > ? "
                           "ORDER BY seq", (job_id, after))
        return [(r["seq"], r["event"], json.loads(r["data"])) for r in rows]

    def interrupted_jobs(self) -> list[dict[str, Any]]:
        """Jobs that were placed or running when the queen stopped."""
        return self.jobs(states=[s.value for s in ACTIVE_STATES], limit=100_000)

    def queued_jobs(self) -> list[dict[str, Any]]:
        return sorted(self.jobs(states=[JobState.queued.value], limit=100_000),
                      key=lambda j: j["created"])

    def counts(self) -> dict[str, int]:
        return {r["state"]: r["n"] for r in
                self._query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")}

    # workers, hosts, models, samples

    def save_worker(self, host: str, worker_id: str, doc: dict[str, Any]) -> None:
        self._tx([("INSERT OR REPLACE INTO workers VALUES (?, ?, ?)",
                   (host, worker_id, json.dumps(doc)))])

    def drop_worker(self, host: str, worker_id: str) -> None:
        self._tx([("DELETE FROM workers WHERE host = ? AND id = ?", (host, worker_id))])

    def workers(self) -> list[dict[str, Any]]:
        return [json.loads(r["doc"]) for r in self._query("SELECT doc FROM workers")]

    def save_host(self, name: str, doc: dict[str, Any]) -> None:
        self._tx([("INSERT OR REPLACE INTO hosts VALUES (?, ?)", (name, json.dumps(doc)))])

    def hosts(self) -> dict[str, dict[str, Any]]:
        return {r["name"]: json.loads(r["doc"]) for r in self._query("SELECT * FROM hosts")}

    def set_ttl(self, model: str, ttl: float | None) -> None:
        if ttl is None:
            self._tx([("DELETE FROM models WHERE id = ?", (model,))])
        else:
            self._tx([("INSERT OR REPLACE INTO models VALUES (?, ?)", (model, ttl))])

    def ttls(self) -> dict[str, float]:
        return {r["id"]: float(r["ttl"]) for r in self._query("SELECT * FROM models")}

    def add_sample(self, at: float, doc: dict[str, Any], keep_s: float = 3600.0) -> None:
        self._tx([("INSERT INTO samples VALUES (?, ?)", (at, json.dumps(doc))),
                  ("DELETE FROM samples WHERE at < ?", (at - keep_s,))])

    def samples(self, since: float) -> list[dict[str, Any]]:
        return [{"at": r["at"], **json.loads(r["doc"])}
                for r in self._query("SELECT * FROM samples WHERE at >= ? ORDER BY at",
                                     (since,))]
