"""One worker on several GPUs of a host (llama.cpp's layer split): how rbee-hive starts it
(argv, environment), what the worker accepts, what it asks llama.cpp for, and what /health
says. In process or with short-lived real processes: no GPU needed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import llama_cpp
import pytest
from starlette.testclient import TestClient

from rbee_common.errors import UsageError
from tests.helpers import BIN
from worker.app import WorkerSettings, create_app
from worker.engine import Engine, EngineSettings, llama_kwargs
from worker.launch import build_backends, check_devices, worker_argv, worker_env
from worker.protocol import TOKEN_ENV

ARGS = {"model_path": "/m/tiny.gguf", "port": 8100, "host": "127.0.0.1", "worker_id": "w-1",
        "ctx": 512, "model_id": "tiny"}


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_argv_for_one_device_is_as_before() -> None:
    argv = worker_argv(backend="cuda", device=2, **ARGS)
    assert flag(argv, "--device") == "2" and "--tensor-split" not in argv
    assert flag(worker_argv(backend="cpu", device=0, **ARGS), "--device") == "0"


def test_argv_for_several_devices() -> None:
    argv = worker_argv(backend="cuda", device=[1, 3], tensor_split=[0.6, 0.4], **ARGS)
    assert flag(argv, "--device") == "1,3" and flag(argv, "--tensor-split") == "0.6,0.4"
    even = worker_argv(backend="cuda", device=(0, 1), **ARGS)
    assert flag(even, "--device") == "0,1" and "--tensor-split" not in even


def test_env_pins_every_device_in_pci_order() -> None:
    env = worker_env("t" * 32, "cuda", 2)
    assert env["CUDA_VISIBLE_DEVICES"] == "2" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env[TOKEN_ENV] == "t" * 32
    assert worker_env("t" * 32, "cuda", [3, 1])["CUDA_VISIBLE_DEVICES"] == "3,1"
    assert "CUDA_VISIBLE_DEVICES" not in worker_env("t" * 32, "cpu", 0)


@pytest.mark.parametrize("backend, devices, split, words", [
    ("cpu", [0, 1], None, "a cpu worker runs on one device"),
    ("cuda", [0, 1], [1.0], "1 shares for 2 devices"),
    ("cuda", [0, 1], [0.5, 0.0], "above 0"),
    ("cuda", [0, 0], None, "distinct"),
    ("cuda", [-1], None, "distinct"),
    ("cuda", [], None, "distinct"),
])
def test_devices_a_worker_cannot_run_are_refused(backend: str, devices: list[int],
                                                 split: list[float] | None, words: str) -> None:
    with pytest.raises(UsageError, match=words):
        check_devices(backend, devices, split)
    with pytest.raises(UsageError, match=words):
        worker_argv(backend=backend, device=devices, tensor_split=split, **ARGS)


@pytest.mark.parametrize("args, words", [
    (["--backend", "cpu", "--device", "0,1"], "a cpu worker runs on one device"),
    (["--backend", "cuda", "--device", "0,1", "--tensor-split", "1"], "1 shares for 2 devices"),
    (["--backend", "cuda", "--device", "0,x"], "'0,x' is not a device index"),
    (["--backend", "cuda", "--device", "0,1", "--tensor-split", "0.5,half"],
     "is not a comma list of proportions"),
])
def test_the_worker_refuses_them_as_usage_errors(args: list[str], words: str) -> None:
    proc = subprocess.run([str(BIN / "llm-worker-rbee"), "--model", "/nonexistent.gguf",
                           "--port", "1", "--worker-id", "w", *args],
                          env={TOKEN_ENV: "t" * 32}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr
    assert proc.stdout == ""


def settings(backend: str, n_devices: int = 1,
             tensor_split: tuple[float, ...] | None = None) -> EngineSettings:
    return EngineSettings(model_path="/m/tiny.gguf", backend=backend, ctx=512,
                          n_devices=n_devices, tensor_split=tensor_split)


def test_llama_kwargs_for_one_gpu_keep_the_whole_model_there() -> None:
    kw = llama_kwargs(settings("cuda"))
    assert kw["n_gpu_layers"] == -1 and kw["main_gpu"] == 0
    assert kw["split_mode"] == llama_cpp.LLAMA_SPLIT_MODE_NONE and "tensor_split" not in kw


def test_llama_kwargs_for_several_gpus_split_by_layer() -> None:
    even = llama_kwargs(settings("cuda", 2))
    assert even["n_gpu_layers"] == -1
    assert even["split_mode"] == llama_cpp.LLAMA_SPLIT_MODE_LAYER
    assert even["tensor_split"] == [1.0, 1.0]
    shares = llama_kwargs(settings("cuda", 3, (0.5, 0.3, 0.2)))
    assert shares["tensor_split"] == [0.5, 0.3, 0.2]


def test_llama_kwargs_for_cpu_offload_nothing() -> None:
    kw = llama_kwargs(settings("cpu"))
    assert kw["n_gpu_layers"] == 0
    assert not {"split_mode", "main_gpu", "tensor_split"} & kw.keys()


def test_llama_accepts_the_split_kwargs(tiny_model: Path) -> None:
    """llama_cpp.Llama takes the two-device arguments (a CPU build has no GPU to split
    across, so llama.cpp keeps every layer on its one device; a CUDA build is checked by
    tests/test_gpu_worker.py)."""
    if build_backends()["cuda"] or build_backends()["metal"]:
        pytest.skip("this build offloads to real GPUs: see tests/test_gpu_worker.py")
    engine = Engine(EngineSettings(model_path=str(tiny_model), backend="cuda", ctx=256,
                                   n_devices=2, tensor_split=(0.6, 0.4)))
    engine.load()
    try:
        assert engine.logs.offloaded() == (3, 3)
        assert len(engine.tokenize("Hello")) > 1
    finally:
        engine.close()


def test_health_lists_every_device() -> None:
    engine = Engine(settings("cuda", 2))  # not loaded: /health answers while a model loads
    app = create_app(WorkerSettings(worker_id="w-2", model_id="tiny", backend="cuda",
                                    devices=(2, 3), ctx=512, token="t" * 32), engine)
    with TestClient(app) as client:
        doc = client.get("/health").json()
    assert doc["status"] == "loading"
    assert doc["device"] == 2 and doc["devices"] == [2, 3] and doc["vram_bytes"] == 0
