"""How rbee-hive starts a worker: its argv and environment, and what the build can run.

Kept free of heavy imports: rbee-hive imports this on its hot paths.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from rbee_common.errors import UsageError
from rbee_common.names import Backend, is_gpu
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
        "rpc": any("ggml-rpc" in n for n in names),  # lending and borrowing (rbee_common.rpc)
    }


def device_list(device: int | Sequence[int]) -> tuple[int, ...]:
    """The device indexes of `--device` (one index, or several for a layer-split GPU worker)."""
    return (int(device),) if isinstance(device, int) else tuple(int(d) for d in device)


def parse_devices(text: str) -> tuple[int, ...]:
    """`--device 0` or `--device 0,1` → (0,) or (0, 1)."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{text!r} is not a device index or a comma list of them") from None


def parse_split(text: str) -> tuple[float, ...]:
    """`--tensor-split 0.6,0.4` → (0.6, 0.4)."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{text!r} is not a comma list of proportions") from None


def check_devices(backend: str, devices: Sequence[int],
                  tensor_split: Sequence[float] | None = None, n_rpc: int = 0) -> None:
    """Refuse a device list (and split) a worker cannot run: one rule for argv and the worker.

    `n_rpc` lenders (rbee_common.rpc) come first in the split, before the local devices."""
    if not devices or any(d < 0 for d in devices) or len(set(devices)) != len(devices):
        raise UsageError(f"devices {list(devices)}: give distinct device indexes (0, 1, ...)")
    if len(devices) > 1 and not is_gpu(backend):
        raise UsageError(f"a {backend} worker runs on one device, not {len(devices)}",
                         hint="Give one --device, or a GPU backend to split a model.")
    if tensor_split is not None:
        if len(tensor_split) != n_rpc + len(devices):
            what = f"{n_rpc} lender(s) and {len(devices)} device(s)" if n_rpc else \
                f"{len(devices)} devices"
            raise UsageError(f"--tensor-split has {len(tensor_split)} shares for {what}",
                             hint="Give one share per device, the --rpc lenders first.")
        if not all(0 < share < math.inf for share in tensor_split):
            raise UsageError("every --tensor-split share must be above 0 (every device listed "
                             "holds part of the model)")


def worker_argv(*, model_path: str, backend: str, device: int | Sequence[int], port: int,
                host: str, worker_id: str, ctx: int, model_id: str, threads: int | None = None,
                tensor_split: Sequence[float] | None = None,
                rpc: Sequence[str] = ()) -> list[str]:
    """The worker's command line: an explicit argument list, never a shell string.

    Several devices (a GPU worker with llama.cpp's layer split) go as `--device 0,1`, with
    `--tensor-split` when the model is not split evenly between them; RPC lenders it borrows
    memory from as `--rpc HOST:PORT,HOST:PORT` (their shares first in the split)."""
    devices = device_list(device)
    check_devices(backend, devices, tensor_split, len(rpc))
    script = Path(sys.executable).parent / "llm-worker-rbee"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "worker"]
    if not script.exists() and shutil.which("llm-worker-rbee"):
        head = [str(shutil.which("llm-worker-rbee"))]
    argv = [*head, "--model", model_path, "--backend", backend,
            "--device", ",".join(map(str, devices)), "--port", str(port), "--host", host,
            "--worker-id", worker_id, "--ctx", str(ctx), "--model-id", model_id]
    if threads:
        argv += ["--threads", str(threads)]
    if rpc:
        argv += ["--rpc", ",".join(rpc)]
    if tensor_split is not None:
        argv += ["--tensor-split", ",".join(map(repr, map(float, tensor_split)))]
    return argv


# What a worker inherits from the hive: an allow-list, so a secret the hive holds (HF_TOKEN,
# SSH_AUTH_SOCK, cloud keys, the queen's token) never reaches a process that serves HTTP.
# The worker needs to find its interpreter and libraries, its locale, and the knobs of
# llama.cpp and the GPU runtimes; nothing else.
_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR",
    "LD_LIBRARY_PATH", "LD_PRELOAD", "DYLD_LIBRARY_PATH", "DYLD_FALLBACK_LIBRARY_PATH",
    "VIRTUAL_ENV", "CONDA_PREFIX",
    "RBEE_WORKER_THREADS", "RBEE_LLAMA_EXTRA_BUFTS", "RBEE_DEBUG", "RBEE_RPC_TIMEOUT",
})
_ENV_PREFIXES = (
    "LC_", "PYTHON",
    "CUDA_", "NVIDIA_", "HIP_", "HSA_", "ROCM_", "ROCR_", "GPU_DEVICE_ORDINAL",
    "METAL_", "MTL_", "GGML_", "LLAMA_",
    "OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_",
)


def passes_to_worker(name: str) -> bool:
    """Is this variable of the hive's environment one a worker gets?"""
    return name in _ENV_NAMES or name.startswith(_ENV_PREFIXES)


def worker_env(token: str, backend: str, device: int | Sequence[int]) -> dict[str, str]:
    """The worker's environment: the allowed part of ours, the token (never argv, where `ps`
    shows it) and its devices."""
    env = {k: v for k, v in os.environ.items() if passes_to_worker(k)}
    env[TOKEN_ENV] = token
    env["PYTHONUNBUFFERED"] = "1"
    if backend == Backend.cuda:
        # NVML and CUDA number devices the same way only in PCI bus order
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        # inside the worker its devices are then 0..n-1, in the order given
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, device_list(device)))
    return env
