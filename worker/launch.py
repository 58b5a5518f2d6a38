"""How rbee-hive starts a worker: its argv and environment, and what the build can run.

Kept free of heavy imports: rbee-hive imports this on its hot paths.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from rbee_common.names import Backend
from worker.protocol import TOKEN_ENV


def llama_lib_dir() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def build_backends() -> dict[str, bool]:
    """Which backends the installed llama-cpp-python was built with, read off its libraries."""
    lib = llama_lib_dir()
    names = [p.name.lower() for p in lib.iterdir()] if lib and lib.is_dir() else []
    return {
        "installed": lib is not None,
        Backend.cuda: any("ggml-cuda" in n for n in names),
        Backend.metal: any("ggml-metal" in n for n in names) or (
            sys.platform == "darwin" and any(n.startswith("libggml") for n in names)),
        Backend.cpu: lib is not None,
    }


def worker_argv(*, model_path: str, backend: str, device: int, port: int, host: str,
                worker_id: str, ctx: int, model_id: str, threads: int | None = None) -> list[str]:
    """The worker's command line: an explicit argument list, never a shell string."""
    script = Path(sys.executable).parent / "llm-worker-rbee"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "worker"]
    if not script.exists() and shutil.which("llm-worker-rbee"):
        head = [str(shutil.which("llm-worker-rbee"))]
    argv = [*head, "--model", model_path, "--backend", backend, "--device", str(device),
            "--port", str(port), "--host", host, "--worker-id", worker_id, "--ctx", str(ctx),
            "--model-id", model_id]
    if threads:
        argv += ["--threads", str(threads)]
    return argv


def worker_env(token: str, backend: str, device: int) -> dict[str, str]:
    """The worker's environment: the token (never argv, where `ps` shows it) and its device."""
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    env[TOKEN_ENV] = token
    env["PYTHONUNBUFFERED"] = "1"
    if backend == Backend.cuda:
        # NVML and CUDA number devices the same way only in PCI bus order
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = str(device)
    return env
