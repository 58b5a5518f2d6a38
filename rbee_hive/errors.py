"""Errors rbee-hive raises; codes from DESIGN.md §5."""

from __future__ import annotations

from rbee_common.errors import (  # noqa: F401  (re-exported: raised by rbee-hive)
    InsufficientRam,
    InsufficientVram,
    RbeeError,
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
