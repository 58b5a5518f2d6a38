"""Token streaming, side by side on one model and prompt: `rbee infer` on a warm worker vs
llama-cpp-python in-process vs `python -m llama_cpp.server` (OpenAI streaming).

Every contender runs greedy decoding with the same threads, context, prompt and device, one
after the other; time to first token and tokens/s are measured by the client in each case.
Where CUDA can run (an NVML device and a llama build that offloads), every contender runs on
it: all layers offloaded (n_gpu_layers -1) and rbee pinned with --backend cuda; --cpu keeps
them all on the CPU.

    python bench/stream.py [--model PATH.gguf] [--max-tokens 256] [--runs 5] [--cpu]
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _common import (
    BIN,
    ROOT,
    Sandbox,
    cuda_unavailable,
    emit,
    median,
    model_path,
    parser,
    ratio,
)

PROMPT = "The capital of France is"


# One streamed answer: time to first token (ms), decode time after it (ms), tokens, text.
Sample = tuple[float, float, int, str]


def summarise(samples: list[Sample]) -> dict[str, Any]:
    """Medians over the samples, and the head of the last one's text."""
    return {
        "ttft_ms": median([s[0] for s in samples]),
        "tokens_per_sec": median([(s[2] - 1) / (s[1] / 1000) for s in samples if s[1] > 0]),
        "tokens": median([float(s[2]) for s in samples]),
        "runs": len(samples),
        "text_head": samples[-1][3][:24] if samples else "",
    }


def timed_stream(pieces: Iterator[str]) -> Sample:
    """Consume a stream of text pieces (empty ones ignored), timing it from now."""
    t0 = time.perf_counter()
    first = last = 0.0
    parts = []
    for piece in pieces:
        if piece:
            last = time.perf_counter()
            first = first or last
            parts.append(piece)
    return (first - t0) * 1000, (last - first) * 1000, len(parts), "".join(parts)


def device_args(args: Any) -> None:
    """Put every contender on one device: CUDA where it can run (unless --cpu), else the CPU."""
    args.cuda_unavailable = "--cpu given" if args.cpu else cuda_unavailable()
    args.backend = "cpu" if args.cuda_unavailable else "cuda"
    args.gpu_layers = 0 if args.cuda_unavailable else -1


class InProcessFailed(RuntimeError):
    """The llama-cpp-python baseline's process ended before answering (its log's tail)."""


class InProcess:
    """llama-cpp-python in a process of its own, as in-process as it gets: it loads the model
    (timed there), then streams one answer per line sent to it, timed there. A crash in it
    (one was seen on an H200, inside the load) is reported with its faulthandler traceback
    and llama.cpp's log, and the other contenders are measured all the same."""

    def __init__(self, model: Path, args: Any) -> None:
        import tempfile

        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by close())
        self.proc = subprocess.Popen(
            [sys.executable, "-X", "faulthandler", __file__, "--inprocess", str(model),
             "--backend", args.backend, "--gpu-layers", str(args.gpu_layers), "--ctx",
             str(args.ctx), "--threads", str(args.threads), "--max-tokens",
             str(args.max_tokens)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.load_ms = float(self._reply()["load_ms"])

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line:
            return json.loads(line)
        code = self.proc.wait()
        self.log.seek(0)
        tail = "\n".join(self.log.read().splitlines()[-40:])
        raise InProcessFailed(f"the llama-cpp-python process exited with {code}:\n{tail}")

    def once(self) -> Sample:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        ttft, decode, tokens, text = self._reply()["sample"]
        return ttft, decode, tokens, text

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def inprocess_child(argv: list[str]) -> None:
    """`bench/stream.py --inprocess MODEL …`: the process behind `InProcess`."""
    import argparse

    import llama_cpp

    from worker.engine import extra_buffer_types_wanted, model_params

    p = argparse.ArgumentParser()
    p.add_argument("model", type=Path)
    for name in ("--backend",):
        p.add_argument(name, required=True)
    for name in ("--gpu-layers", "--ctx", "--threads", "--max-tokens"):
        p.add_argument(name, type=int, required=True)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    with model_params(use_extra_bufts=extra_buffer_types_wanted(a.backend)):
        # verbose: llama-cpp-python's quiet mode points fd 2 at /dev/null during the load,
        # which would hide a crash's faulthandler traceback
        llm = llama_cpp.Llama(str(a.model), n_ctx=a.ctx, n_gpu_layers=a.gpu_layers,
                              n_threads=a.threads, n_threads_batch=a.threads, verbose=True)
    print(json.dumps({"load_ms": (time.perf_counter() - t0) * 1000}), flush=True)
    llm.verbose = False  # no timing report on stderr after each answer
    for _ in sys.stdin:
        print(json.dumps({"sample": inprocess_once(llm, a)}), flush=True)
    llm.close()


def inprocess_once(llm: Any, args: Any) -> Sample:
    return timed_stream(chunk["choices"][0]["text"] for chunk in llm.create_completion(
        PROMPT, max_tokens=args.max_tokens, temperature=0.0, stream=True))


def inprocess(model: Path, args: Any) -> dict[str, Any]:
    child = InProcess(model, args)
    samples = [child.once() for _ in range(args.runs + 1)][1:]  # the first warms up
    child.close()
    return summarise(samples)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def llama_server_running(model: Path, args: Any) -> Iterator[str]:
    """`python -m llama_cpp.server` on the model, on the same device and threads; its URL."""
    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "_llama_server.py"), "--model", str(model),
         "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
         "--n_ctx", str(args.ctx), "--n_gpu_layers", str(args.gpu_layers),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("llama_cpp.server did not start")
            time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def completions_once(client: Any, url: str, args: Any) -> Sample:
    """One streamed /v1/completions, read as an OpenAI client reads it."""
    body = {"model": "bench", "prompt": PROMPT, "max_tokens": args.max_tokens,
            "temperature": 0.0, "stream": True}

    def pieces() -> Iterator[str]:
        with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    yield json.loads(line[6:])["choices"][0]["text"]

    return timed_stream(pieces())


def llama_server(model: Path, args: Any) -> dict[str, Any]:
    import httpx

    with llama_server_running(model, args) as url, httpx.Client(timeout=300) as client:
        samples = [completions_once(client, url, args) for _ in range(args.runs + 1)][1:]
    return summarise(samples)


def rbee_warm(model: Path, args: Any) -> dict[str, Any]:
    with Sandbox() as box:
        box.run("rbee-hive", "models", "import", str(model), "--id", "bench")
        return infer_runs(box, "bench", args)


def infer_runs(box: Sandbox, model_id: str, args: Any) -> dict[str, Any]:
    """`rbee infer` once (cold, unless a worker already serves the model), then warm runs."""
    infer = infer_argv(model_id, args)
    cold = box.json(*infer)
    runs = [infer_once(box, infer, args) for _ in range(args.runs)]
    return {**summarise([r[0] for r in runs]),
            **{k: median([r[1][k] for r in runs]) for k in runs[0][1]},
            "cold_total_ms": cold["timings"]["total_ms"], "worker_threads": os.cpu_count()}


def infer_argv(model_id: str, args: Any) -> list[str]:
    return ["rbee", "infer", "--model", model_id, "--prompt", PROMPT, "--max-tokens",
            str(args.max_tokens), "--temperature", "0", "--ctx", str(args.ctx),
            "--backend", args.backend]


def infer_once(box: Sandbox, argv: list[str], args: Any) -> tuple[Sample, dict[str, float]]:
    """One warm `rbee infer`: its sample (its own timings) and the worker's figures."""
    t0 = time.perf_counter()
    doc = box.json(*argv)
    wall = (time.perf_counter() - t0) * 1000
    assert doc["placement"]["path"] == "warm", doc["placement"]
    assert doc["worker"]["backend"] == args.backend, doc["worker"]
    t = doc["timings"]
    sample = (t["ttft_ms"], t["stream_ms"] - t["ttft_ms"], doc["tokens"], doc["text"])
    return sample, {"worker_ttft_ms": t["worker_ttft_ms"],
                    "worker_tokens_per_sec": t["tokens_per_sec"], "process_wall_ms": wall}


def main() -> None:
    if sys.argv[1:2] == ["--inprocess"]:
        inprocess_child(sys.argv[2:])
        return
    p = parser(__doc__ or "")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--cpu", action="store_true", help="keep every contender on the CPU")
    args = p.parse_args()
    if args.quick:
        args.max_tokens, args.runs = 32, 1
    device_args(args)
    with Sandbox() as scratch:
        model = model_path(args.model, scratch.root)
        results = {
            "llama_cpp_inprocess": inprocess(model, args),
            "llama_cpp_server": llama_server(model, args),
            "rbee_infer_warm": rbee_warm(model, args),
        }
    r, base, server = (results[k] for k in ("rbee_infer_warm", "llama_cpp_inprocess",
                                           "llama_cpp_server"))
    emit({"benchmark": "stream", "model": str(model), "prompt": PROMPT,
          "max_tokens": args.max_tokens, "threads": args.threads, "backend": args.backend,
          "n_gpu_layers": args.gpu_layers, "cuda_unavailable": args.cuda_unavailable,
          "results": results,
          "ratios": {
              "rbee_vs_inprocess_tokens_per_sec": ratio(r["tokens_per_sec"],
                                                        base["tokens_per_sec"]),
              "rbee_vs_server_tokens_per_sec": ratio(r["tokens_per_sec"],
                                                     server["tokens_per_sec"]),
              "server_vs_inprocess_tokens_per_sec": ratio(server["tokens_per_sec"],
                                                          base["tokens_per_sec"]),
              "rbee_vs_inprocess_ttft": ratio(r["ttft_ms"], base["ttft_ms"]),
              "rbee_vs_server_ttft": ratio(r["ttft_ms"], server["ttft_ms"]),
          }}, args.out)


if __name__ == "__main__":
    sys.path.insert(0, str(BIN))
    main()
