"""Errors a worker reports: at start-up (as its log's last line) or as HTTP JSON bodies."""

from __future__ import annotations

from rbee_common.errors import (  # noqa: F401  (re-exported: the worker raises them)
    AllSlotsBusy,
    InvalidRequest,
    RbeeError,
    Unauthorized,
)


class BackendUnavailable(RbeeError):
    """The requested backend cannot run here (no GPU build, no device)."""

    code = "BACKEND_UNAVAILABLE"
    default_hint = ('Rebuild llama-cpp-python for the backend, e.g. CMAKE_ARGS="-DGGML_CUDA=on" '
                    "pip install --force-reinstall --no-cache-dir llama-cpp-python, or use cpu.")


class ModelLoadFailed(RbeeError):
    """llama.cpp could not load the model (or not entirely onto the GPU)."""

    code = "MODEL_LOAD_FAILED"
    default_hint = "Read the worker log; a smaller model, quantisation or --ctx may fit."


class PortInUse(RbeeError):
    """The worker's port is taken by another program."""

    code = "NO_FREE_PORT"
    default_hint = "Spawn again without --port to let rbee-hive pick a free one."





class WorkerLoading(RbeeError):
    """The model is still loading."""

    code = "WORKER_LOADING"
    default_hint = "Poll GET /health until status is ready."
