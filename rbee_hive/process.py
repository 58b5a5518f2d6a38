"""A worker's process as seen from the hive: is it alive, does it answer, end it."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rbee_common.fit import worker_devices
from rbee_common.http import get_health
from rbee_common.names import Backend

VRAM_RELEASE_TIMEOUT = 5.0


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


def find_worker(wid: str, workers_dir: Path, flag: str = "--worker-id") -> int | None:
    """The pid of the running worker `wid` of this state dir, found without its record.

    For a worker whose record is damaged or was cut short before its pid was written: the
    process is known by `--worker-id ID` on its command line and its working directory,
    which rbee-hive sets to the workers dir (a lender: `--lender-id ID`, the lenders dir).
    None where there is no procfs (macOS).
    """
    needle = b"\0" + flag.encode() + b"\0" + wid.encode() + b"\0"
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    try:
        home = workers_dir.resolve()
    except OSError:
        return None
    for name in entries:
        if not name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            if needle not in b"\0" + cmdline or Path(os.readlink(f"/proc/{name}/cwd")) != home:
                continue
        except OSError:  # gone meanwhile, or another user's
            continue
        if pid_alive(int(name), wid):
            return int(name)
    return None


def _probe_host(bind: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(bind, bind)


def http_health(host: str, port: int, timeout: float = 1.0) -> dict[str, Any] | None:
    """GET /health with the standard library: status must not pay for an HTTP client import."""
    probe = _probe_host(host)
    return get_health(f"http://[{probe}]:{port}" if ":" in probe else f"http://{probe}:{port}",
                      timeout)


def cuda_devices_of(record: dict[str, Any]) -> list[int]:
    """The NVML indexes of the GPUs a worker record holds memory on ([] unless cuda)."""
    return worker_devices(record) if record.get("backend") == Backend.cuda else []


def terminate(pid: int, wid: str, grace: float, cuda_devices: Sequence[int] = ()) -> str | None:
    """SIGTERM the worker's process group, wait `grace` seconds, then SIGKILL.

    For a CUDA worker it then waits until the driver has released the worker's VRAM, so a
    caller that reads free memory right after (placement, the next spawn) sees it free.
    """
    used = _signal_until_gone(pid, wid, grace)
    if cuda_devices:
        wait_vram_released(pid, cuda_devices)
    return used


def wait_vram_released(pid: int, devices: Sequence[int],
                       timeout: float = VRAM_RELEASE_TIMEOUT) -> bool:
    """Wait (at most `timeout` s) until NVML lists no memory of `pid` on `devices`.

    The driver frees a dead process's memory a moment after the process is gone. Without
    NVML, cuda_memory_of answers 0 and this returns at once. True when released in time.
    """
    from worker.engine import cuda_memory_of

    deadline = time.monotonic() + timeout
    while cuda_memory_of(pid, devices):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _signal_until_gone(pid: int, wid: str, grace: float) -> str | None:
    """SIGTERM the process group, SIGKILL after `grace` s; the signal that ended it, if any."""
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
