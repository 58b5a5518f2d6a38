"""A worker's log file: its tail, the structured error it ends with, and following it."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rbee_common.errors import RbeeError, RemoteError
from rbee_hive import schemas
from rbee_hive.process import pid_alive
from rbee_hive.registry import Registry
from worker.protocol import ERROR_LINE_PREFIX


def log_tail(path: Path, lines: int = 20) -> list[str]:
    """The last `lines` lines of a log (read from its last 64 KiB); [] if there is none."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - 64 * 1024, 0))
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    return text.splitlines()[-lines:]


def error_from_log(path: Path) -> RbeeError | None:
    """The structured error a worker writes as its last words, if it wrote one."""
    tail = log_tail(path, 200)
    for line in reversed(tail):
        if line.startswith(ERROR_LINE_PREFIX):
            try:
                err = json.loads(line[len(ERROR_LINE_PREFIX):])
            except ValueError:
                break
            details = {**(err.get("details") or {}), "log_tail": tail[-20:]}
            return RemoteError(str(err.get("code")), str(err.get("message")),
                               hint=str(err.get("hint") or ""), **details)
    return None


def follow_log(wid: str, lines: int, follow: bool) -> Iterator[str]:
    """The log's last lines, then (with follow) new lines until the worker exits."""
    from rbee_common.logfollow import follow as follow_file

    reg = Registry()
    record = reg.get(wid)
    alive = (lambda: pid_alive(record["pid"], wid)) if follow else None
    yield from follow_file(reg.log_path(wid), lines, alive)


def raise_if_exited(reg: Registry, record: dict[str, Any], proc: subprocess.Popen[bytes] | None,
                    crashed: Callable[[int, list[str]], RbeeError]) -> None:
    """A worker or lender process that exited while starting: raise the coded error it wrote
    in its log (else `crashed(status, log tail)`), recorded as its record's state."""
    rid = record["id"]
    code = proc.poll() if proc is not None else (
        None if pid_alive(record["pid"], rid) else -1)
    if code is None:
        return
    path = reg.log_path(rid)
    err = error_from_log(path) or crashed(code, log_tail(path))
    reg.update(rid, state=schemas.ERROR, message=err.message, exit_code=code)
    raise err
