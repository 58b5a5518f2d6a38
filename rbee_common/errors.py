"""The error type every rbee command raises, and the JSON envelope it becomes (DESIGN.md §5)."""

from __future__ import annotations

from typing import Any, ClassVar


class RbeeError(Exception):
    """Something the user can act on: a code from DESIGN.md §5, a message and a hint."""

    code: ClassVar[str] = "INTERNAL"
    exit_code: ClassVar[int] = 1
    default_hint: ClassVar[str] = ""

    def __init__(self, message: str, *, hint: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = self.default_hint if hint is None else hint
        self.details = {k: v for k, v in details.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "hint": self.hint,
            "details": self.details,
        }

    def envelope(self) -> dict[str, Any]:
        return {"error": self.to_dict()}


class RemoteError(RbeeError):
    """An error another rbee process reported as JSON; it keeps that process's code."""

    def __init__(self, code: str, message: str, *, hint: str = "", exit_code: int = 1,
                 **details: Any) -> None:
        super().__init__(message, hint=hint, **details)
        # this error *is* the remote one: callers read .code and .exit_code as for any other
        self.code = code  # type: ignore[misc]
        self.exit_code = exit_code  # type: ignore[misc]

    @classmethod
    def from_envelope(cls, doc: dict[str, Any], exit_code: int = 1) -> RemoteError:
        err = doc.get("error") or {}
        return cls(
            str(err.get("code", "INTERNAL")),
            str(err.get("message", "unknown error")),
            hint=str(err.get("hint") or ""),
            exit_code=exit_code,
            **(err.get("details") or {}),
        )


class UsageError(RbeeError):
    """The command line itself is wrong."""

    code = "USAGE"
    exit_code = 2


class ConfigInvalid(RbeeError):
    """A configuration file cannot be read; details carry its path and line."""

    code = "CONFIG_INVALID"
    default_hint = "Fix the file at the line shown, or move it aside to use the defaults."


class InvalidModelRef(RbeeError):
    """A model reference is none of: catalog id, hf:, file:, https:."""

    code = "INVALID_MODEL_REF"
    default_hint = (
        "Use a catalog id (rbee-hive models catalog), hf:ORG/REPO[@REV]/FILE.gguf, "
        "file:/absolute/path.gguf or https://host/path/file.gguf."
    )


class ModelNotFound(RbeeError):
    """The model is neither registered here, in the catalog, nor at its source."""

    code = "MODEL_NOT_FOUND"
    default_hint = ("List what is available with `rbee-hive models catalog` and "
                    "`rbee-hive models list`.")


class Interrupted(RbeeError):
    """The user pressed Ctrl+C."""

    code = "CANCELLED"
    exit_code = 130


class InsufficientMemory(RbeeError):
    """The model at this context size needs more memory than the device has free."""

    code = "INSUFFICIENT_RAM"


class InsufficientVram(InsufficientMemory):
    """The model at this context size needs more VRAM than the GPU has free."""

    code = "INSUFFICIENT_VRAM"


class InsufficientRam(InsufficientMemory):
    """The model at this context size needs more RAM than is available."""

    code = "INSUFFICIENT_RAM"


class WorkerCrashed(RbeeError):
    """The worker process is gone (or stopped answering)."""

    code = "WORKER_CRASHED"
    default_hint = "Read its log with `rbee-hive worker logs ID`, then stop it to clear the record."


class WorkerNotFound(RbeeError):
    """No worker with this id is registered."""

    code = "WORKER_NOT_FOUND"
    default_hint = "List the workers with `rbee-hive worker list` (or `rbee workers list`)."


class AllSlotsBusy(RbeeError):
    """The worker is already running a job (one at a time in M0)."""

    code = "ALL_SLOTS_BUSY"
    default_hint = "Retry after the Retry-After seconds, or spawn another worker."


class InvalidRequest(RbeeError):
    """An HTTP request body is not what the route accepts."""

    code = "INVALID_REQUEST"


class Unauthorized(RbeeError):
    """The bearer token is missing or wrong."""

    code = "UNAUTHORIZED"
    default_hint = "Send `Authorization: Bearer <token>` with the server's token."


class RpcUnavailable(RbeeError):
    """This llama-cpp-python build has no RPC backend: it can neither lend nor borrow memory."""

    code = "RPC_UNAVAILABLE"
    default_hint = ('Rebuild llama-cpp-python with RPC: CMAKE_ARGS="-DGGML_RPC=on" pip install '
                    "--force-reinstall --no-cache-dir llama-cpp-python (scripts/bootstrap.sh "
                    "and `rbee hosts install` do).")


class LenderUnreachable(RbeeError):
    """Nothing answers llama.cpp's RPC protocol at a lender's endpoint (details: endpoint)."""

    code = "RPC_LENDER_UNREACHABLE"


class LenderBusy(RbeeError):
    """A lender accepted the connection but did not answer in time: it serves another client
    (llama.cpp's RPC server serves one at a time)."""

    code = "RPC_LENDER_BUSY"


class RpcProtocolMismatch(RbeeError):
    """A lender speaks another version of llama.cpp's RPC protocol than this build."""

    code = "RPC_PROTOCOL_MISMATCH"
