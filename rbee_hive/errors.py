"""Errors rbee-hive raises; codes from DESIGN.md §5."""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

from rbee_common.errors import (  # noqa: F401  (re-exported: raised by rbee-hive)
    InsufficientRam,
    InsufficientVram,
    LenderBusy,
    LenderUnreachable,
    RbeeError,
    RpcProtocolMismatch,
    RpcUnavailable,
    WorkerCrashed,
    WorkerNotFound,
)


class DownloadFailed(RbeeError):
    """The transfer failed; what arrived is kept and the next run resumes from it."""

    code = "DOWNLOAD_FAILED"
    default_hint = "Run the same command again: it resumes from the bytes already on disk."


class ChecksumMismatch(RbeeError):
    """The file's sha256 is not the one expected; nothing was registered."""

    code = "CHECKSUM_MISMATCH"
    default_hint = ("The source changed or the transfer was corrupted. Check the sha256 in "
                    "catalog.toml, then download again.")


class DiskFull(RbeeError):
    """The file system holding rbee's files has no room left; details name the path and bytes."""

    code = "DISK_FULL"
    default_hint = ("Free space on that file system (`rbee-hive models list`, then "
                    "`rbee-hive models rm ID`) and run the same command again: a download "
                    "resumes from the bytes it kept.")


def is_disk_full(e: BaseException) -> bool:
    """Is this the OS saying the device (or the user's quota) is full?"""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def free_bytes(path: Path) -> int | None:
    """Bytes free to this user on the file system of `path` (or of its nearest parent)."""
    for p in (path, *path.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(p).free
    return None


def disk_full(path: Path, needed: int | None, cause: OSError | None = None) -> DiskFull:
    """The DISK_FULL error for a write of `needed` bytes (None: unknown) at `path`."""
    from rbee_common.estimate import human_bytes

    free = free_bytes(path)
    need = f"{human_bytes(needed)} more needed" if needed is not None else "more room needed"
    return DiskFull(f"no space left on the device holding {path}: {need}, "
                    f"{human_bytes(free)} free"
                    + (f" ({cause.strerror})" if cause is not None and cause.strerror else ""),
                    path=str(path), needed_bytes=needed, free_bytes=free)


@contextlib.contextmanager
def disk_full_as(path: Path, needed: int | None) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT raised inside the block into DISK_FULL naming `path` and `needed`."""
    try:
        yield
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(path, needed, e) from e
        raise


def crashed_hint(wid: str) -> str:
    """What to do about a crashed worker, with its id filled in."""
    return (f"Read its log with `rbee-hive worker logs {wid}`, then `rbee-hive worker stop "
            f"{wid}` to clear the record.")


class NoFreePort(RbeeError):
    """Every port in the worker range is taken."""

    code = "NO_FREE_PORT"
    default_hint = "Stop idle workers (`rbee-hive worker list`, `rbee-hive worker stop ID`)."


class LoadingTimeout(RbeeError):
    """The worker did not become ready in time; it was stopped."""

    code = "LOADING_TIMEOUT"
    default_hint = "Read the log lines above; a large model may need --timeout to be raised."


class ModelInUse(RbeeError):
    """A running worker serves this model."""

    code = "MODEL_IN_USE"
    default_hint = "Stop its workers first, or pass --force."


class GitFailed(RbeeError):
    """git could not update or describe the checkout."""

    code = "GIT_FAILED"


class LenderNotFound(WorkerNotFound):
    """No RPC lender with this id is registered on this host."""

    code = "LENDER_NOT_FOUND"
    default_hint = "List the lenders with `rbee-hive rpc list`."


class LenderCrashed(RbeeError):
    """The lender process ended (or never answered llama.cpp's RPC protocol)."""

    code = "LENDER_CRASHED"


def lender_hint(lid: str) -> str:
    """What to do about a lender that failed, with its id filled in."""
    return (f"Read its log with `rbee-hive rpc logs {lid}`, then `rbee-hive rpc stop {lid}` to "
            "clear the record.")
