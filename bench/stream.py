"""Token streaming, side by side on one model and prompt: `rbee infer` on a warm worker vs
llama-cpp-python in-process vs `python -m llama_cpp.server` (OpenAI streaming).

Every contender runs greedy decoding with the same threads, context and prompt, one after
the other; time to first token and tokens/s are measured by the client in each case.

    python bench/stream.py [--model PATH.gguf] [--max-tokens 256] [--runs 5]
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import BIN, ROOT, Sandbox, emit, median, model_path, parser, ratio

PROMPT = "The capital of France is"


def summarise(samples: list[tuple[float, float, int]]) -> dict[str, Any]:
    """samples: (ttft_ms, decode_ms after the first token, tokens)."""
    return {
        "ttft_ms": median([s[0] for s in samples]),
        "tokens_per_sec": median([(s[2] - 1) / (s[1] / 1000) for s in samples if s[1] > 0]),
        "tokens": median([float(s[2]) for s in samples]),
        "runs": len(samples),
    }


def inprocess(model: Path, args: Any) -> dict[str, Any]:
    import llama_cpp

    from worker.engine import extra_buffer_types_wanted, model_params

    with model_params(use_extra_bufts=extra_buffer_types_wanted("cpu")):
        llm = llama_cpp.Llama(str(model), n_ctx=args.ctx, n_threads=args.threads,
                              n_threads_batch=args.threads, verbose=False)
    samples = []
    for i in range(args.runs + 1):
        t0 = time.perf_counter()
        first = last = 0.0
        n = 0
        for chunk in llm.create_completion(PROMPT, max_tokens=args.max_tokens, temperature=0.0,
                                           stream=True):
            if chunk["choices"][0]["text"]:
                last = time.perf_counter()
                first = first or last
                n += 1
        if i:  # the first run warms caches
            samples.append(((first - t0) * 1000, (last - first) * 1000, n))
    llm.close()
    return summarise(samples)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def llama_server(model: Path, args: Any) -> dict[str, Any]:
    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "_llama_server.py"), "--model", str(model),
         "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
         "--n_ctx", str(args.ctx), "--host", "127.0.0.1", "--port", str(port)],
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
        samples = []
        with httpx.Client(timeout=300) as client:
            for i in range(args.runs + 1):
                body = {"prompt": PROMPT, "max_tokens": args.max_tokens, "temperature": 0.0,
                        "stream": True}
                t0 = time.perf_counter()
                first = last = 0.0
                n = 0
                with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                    for line in r.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        if json.loads(line[6:])["choices"][0]["text"]:
                            last = time.perf_counter()
                            first = first or last
                            n += 1
                if i:
                    samples.append(((first - t0) * 1000, (last - first) * 1000, n))
        return summarise(samples)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def rbee_warm(model: Path, args: Any) -> dict[str, Any]:
    with Sandbox() as box:
        box.run("rbee-hive", "models", "import", str(model), "--id", "bench")
        infer = ["rbee", "infer", "--model", "bench", "--prompt", PROMPT, "--max-tokens",
                 str(args.max_tokens), "--temperature", "0", "--ctx", str(args.ctx)]
        cold = box.json(*infer)
        samples, walls = [], []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            doc = box.json(*infer)
            walls.append((time.perf_counter() - t0) * 1000)
            assert doc["placement"]["path"] == "warm", doc["placement"]
            t = doc["timings"]
            samples.append((t["ttft_ms"], t["stream_ms"] - t["ttft_ms"], doc["tokens"]))
        return {**summarise(samples), "process_wall_ms": median(walls),
                "cold_total_ms": cold["timings"]["total_ms"],
                "worker_threads": os.cpu_count()}


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    if args.quick:
        args.max_tokens, args.runs = 32, 1
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
          "max_tokens": args.max_tokens, "threads": args.threads, "results": results,
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
