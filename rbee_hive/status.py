"""`rbee-hive status`: everything about this host in one document, fast.

It must not import llama_cpp, fastapi or paramiko: a controller calls it on every host
before placing a job.
"""

from __future__ import annotations

import platform
import socket
import sys
from typing import Any

from rbee_common import __version__
from rbee_common.estimate import reserve_bytes
from rbee_common.paths import rbee_home
from rbee_hive import schemas
from rbee_hive.devices import detect
from rbee_hive.lenders import list_lenders
from rbee_hive.store import ModelStore
from rbee_hive.workers import list_workers


def host_info() -> dict[str, Any]:
    return {
        "hostname": socket.gethostname(),
        "platform": sys.platform,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "rbee_version": __version__,
        "rbee_home": str(rbee_home()),
    }


def model_summary(m: dict[str, Any]) -> dict[str, Any]:
    g = m.get("gguf", {})
    return {
        "id": m["id"], "name": m["name"], "source": m["source"], "size": m["size"],
        "sha256": m["sha256"], "path": m["path"],
        "architecture": g.get("architecture"), "parameters": g.get("parameters"),
        "file_type": g.get("file_type"), "context_length": g.get("context_length"),
        "kv_per_token": g.get("kv_per_token"), "data_offset": g.get("data_offset"),
    }


def status() -> dict[str, Any]:
    inventory = detect()
    return {
        "schema": schemas.STATUS,
        "host": host_info(),
        "reserve_bytes": reserve_bytes(),
        "backends": inventory["backends"],
        "devices": inventory["devices"],
        "models": [model_summary(m) for m in ModelStore().list()],
        "workers": list_workers(),
        "lenders": list_lenders(inventory),
    }
