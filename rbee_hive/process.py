"""A worker's process as seen from the hive: is it alive, does it answer, end it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from rbee_common.http import get_health


def pid_alive(pid: int, wid: str) -> bool:
    """Is this worker's process running? Zombies and reused pids count as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():
        return True  # no procfs (macOS): trust kill(0)
    try:
        if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
        return wid.encode() in (proc / "cmdline").read_bytes()
    except (OSError, IndexError):
        return False


def _probe_host(bind: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(bind, bind)


def http_health(host: str, port: int, timeout: float = 1.0) -> dict[str, Any] | None:
    """GET /health with the standard library: status must not pay for an HTTP client import."""
    probe = _probe_host(host)
    return get_health(f"http://[{probe}]:{port}" if ":" in probe else f"http://{probe}:{port}",
                      timeout)


def terminate(pid: int, wid: str, grace: float) -> str | None:
    """SIGTERM the worker's process group, wait `grace` seconds, then SIGKILL."""
    if not pid_alive(pid, wid):
        return None
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return None
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            if not pid_alive(pid, wid):
                return sig.name
            time.sleep(0.05)
    return signal.SIGKILL.name
