"""Which port a new worker listens on: the one asked for if free, else the first free one.

A port is chosen under a lock held machine-wide (not per RBEE_HOME: two hives on one host
share its ports) and reserved for the worker's pid until that process ends, because a worker
binds its port only after it has started (a second or so): until then a test bind succeeds
and another hive would pick the same port. The lock and the reservations live in
$RBEE_RUNTIME_DIR, default /tmp/rbee-ports-<uid> (mode 0700); a hive confined to a private /tmp
(systemd's PrivateTmp) should point RBEE_RUNTIME_DIR at a directory its peers share.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rbee_common.files import atomic_write_json, locked, read_json
from rbee_common.paths import rbee_home
from rbee_hive.errors import NoFreePort
from rbee_hive.process import pid_alive

log = logging.getLogger("rbee.hive.ports")

PORT_RANGE = (8001, 8999)
# RPC lenders (rbee_hive.lenders): from llama.cpp's rpc-server default port up
LENDER_PORT_RANGE = (50052, 50251)


def runtime_dir() -> Path:
    """The directory every hive of this user on this machine shares for port choice."""
    explicit = os.environ.get("RBEE_RUNTIME_DIR")
    if explicit:
        path = Path(explicit).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path
    base = Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())
    path = base / f"rbee-ports-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022:
        return path
    # someone else made it (or made it writable to others): do not trust it
    fallback = rbee_home() / "run"
    log.warning("%s is not a private directory of this user; choosing ports under %s, "
                "which other hives of this machine do not see", path, fallback)
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


@contextlib.contextmanager
def port_lock() -> Iterator[Path]:
    """Hold the machine-wide port lock; yields the directory of the reservations."""
    d = runtime_dir()
    with locked(d / "ports.lock"):
        yield d


def _reservations(d: Path) -> dict[str, Any]:
    doc = read_json(d / "ports.json", default={})  # unparseable: set aside, read as none
    return {k: v for k, v in doc.items() if k.isdigit() and isinstance(v, dict)} \
        if isinstance(doc, dict) else {}


def reserved_ports(d: Path) -> set[int]:
    """Ports reserved for workers that are still running (call with port_lock held)."""
    return {int(port) for port, r in _reservations(d).items()
            if isinstance(r.get("pid"), int) and pid_alive(r["pid"], str(r.get("worker")))}


def reserve(d: Path, port: int, pid: int, wid: str) -> None:
    """Reserve `port` for worker `wid` (process `pid`) while it runs; prune the dead ones."""
    live = {p: r for p, r in _reservations(d).items()
            if isinstance(r.get("pid"), int) and pid_alive(r["pid"], str(r.get("worker")))}
    live[str(port)] = {"pid": pid, "worker": wid, "home": str(rbee_home()), "at": time.time()}
    atomic_write_json(d / "ports.json", live)
    # temp files of writers killed mid-write (SIGKILL skips their clean-up)
    for stale in d.glob(".ports.json.*.tmp"):
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > 60:
                stale.unlink()


def port_free(bind: str, port: int) -> bool:
    """Can a socket bind `port` on `bind` right now?"""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((bind, port))
        except OSError:
            return False
    return True


def pick_port(wanted: int | None, bind: str, taken: set[int],
              span: tuple[int, int] = PORT_RANGE) -> int:
    """`wanted` if it is free, else the first free port of `span` not in `taken`."""
    if wanted is not None:
        if wanted in taken or not port_free(bind, wanted):
            raise NoFreePort(f"port {wanted} on {bind} is in use",
                             hint="Leave out --port to let rbee-hive pick a free one.")
        return wanted
    low, high = span
    for port in range(low, high + 1):
        if port not in taken and port_free(bind, port):
            return port
    raise NoFreePort(f"no free port in {low}–{high} on {bind}")
