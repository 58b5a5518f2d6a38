"""The JSON documents rbee-hive prints: schema names and the shapes the keeper relies on.

rbee_keeper imports this module (and render.py) but nothing else of rbee_hive: it talks to
a hive only through these documents, so the two may run different versions as long as
HIVE_SCHEMA_VERSION matches.
"""

from __future__ import annotations

from typing import Any

from rbee_common.names import LIVE_STATES, WorkerState

__all__ = ["LIVE_STATES", "WorkerState"]

HIVE_SCHEMA_VERSION = 1


def schema(thing: str) -> str:
    return f"rbee.hive.{thing}/v{HIVE_SCHEMA_VERSION}"


STATUS = schema("status")
DETECT = schema("detect")
CATALOG = schema("catalog")
MODELS = schema("models")
MODEL = schema("model")
VERIFY = schema("verify")
REMOVED = schema("removed")
WORKER = schema("worker")
WORKERS = schema("workers")
WORKER_HEALTH = schema("worker-health")
LENDER = schema("lender")
LENDERS = schema("lenders")
STOPPED = schema("stopped")
TOKEN = schema("worker-token")
LOGS = schema("logs")
GIT = schema("git")
DAEMON = schema("daemon")
DAEMON_TOKEN = schema("daemon-token")
DAEMON_HEALTH = schema("daemon-health")

# Worker states in the registry and in `worker list` (their one home is rbee_common.names).
LOADING, READY, BUSY = WorkerState.loading, WorkerState.ready, WorkerState.busy
ERROR, DEAD = WorkerState.error, WorkerState.dead


def schema_version(doc: dict[str, Any]) -> int | None:
    """The version number at the end of a document's "schema" field (None if absent)."""
    name = str(doc.get("schema", ""))
    head, sep, version = name.rpartition("/v")
    if not sep or not head.startswith("rbee.") or not (version.isascii() and version.isdigit()):
        return None
    return int(version)
