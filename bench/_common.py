"""Shared by the benchmarks: isolated rbee dirs, the tiny model, timing, JSON out."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--model", type=Path, help="a GGUF file (default: the tiny test model)")
    p.add_argument("--quick", action="store_true", help="one short run (CI smoke)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    return p


class Sandbox:
    """A throw-away HOME, RBEE_HOME and config dir; the workers it started are stopped."""

    def __init__(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="rbee-bench-")
        self.root = Path(self.tmp.name)
        self.env = {**os.environ, "HOME": str(self.root / "home"),
                    "RBEE_HOME": str(self.root / "rbee-home"),
                    "RBEE_CONFIG_DIR": str(self.root / "config"), "NO_COLOR": "1",
                    "HF_HUB_DISABLE_TELEMETRY": "1"}
        for d in ("home", "config"):
            (self.root / d).mkdir()
        self._cleanups: list[Callable[[], Any]] = []

    def defer(self, fn: Callable[[], Any]) -> None:
        """Run `fn` on close, before the directory (and the state it needs) is deleted."""
        self._cleanups.append(fn)

    def run(self, *argv: str, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(BIN / argv[0]), *argv[1:]] if (BIN / argv[0]).exists() else list(argv)
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**self.env, **env})
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}"
                               f"{proc.stdout[-3000:]}")
        return proc

    def json(self, *argv: str, **env: str) -> Any:
        return json.loads(self.run(*argv, "--format", "json", **env).stdout)

    def close(self) -> None:
        for fn in reversed(self._cleanups):
            fn()
        self.run("rbee-hive", "worker", "stop", "--all", "--timeout", "3", check=False)
        self.tmp.cleanup()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def model_path(arg: Path | None, tmp: Path) -> Path:
    if arg is not None:
        return arg.resolve()
    from tests.tinymodel import write_tiny_model

    return write_tiny_model(tmp / "tiny.gguf")


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3) if values else float("nan")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn()
    return (time.perf_counter() - t0) * 1000, value


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "processor": platform.processor()}


def emit(doc: dict[str, Any], out: Path | None) -> None:
    doc = {**doc, "machine": machine(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                      time.gmtime())}
    text = json.dumps(doc, indent=2)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def cuda_unavailable() -> str | None:
    """Why CUDA cannot run here, or None when it can: an NVML device (rbee-hive's own check)
    and a llama-cpp-python build that offloads to it."""
    from rbee_hive.devices import detect

    reason = next(b["reason"] for b in detect()["backends"] if b["name"] == "cuda")
    if reason is not None:
        return str(reason)
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        return "this llama-cpp-python build cannot offload to a GPU"
    return None


def worker_ttft_total_ms(url: str, token: str) -> float:
    """A worker's own time-to-first-token, summed over its jobs so far (its /metrics)."""
    from rbee_common.http import connect

    conn = connect(url, 5)
    try:
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"})
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    line = next(ln for ln in text.splitlines()
                if ln.startswith("rbee_worker_time_to_first_token_seconds_sum"))
    return float(line.split()[-1]) * 1000
