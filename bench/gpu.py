"""GPU serving, side by side in one run on one model of realistic shape that this script
writes (TinyLlama 1.1B's layers: 22 × 2048, FFN 5632, 32 heads, 4 KV heads, F16, 1.9 GB)
with the planted next-token table of tests/tinymodel.py, so the greedy text is known:

- llama-cpp-python in-process (n_gpu_layers=-1): load time, first token, tokens/s;
- `python -m llama_cpp.server --n_gpu_layers -1`, streaming /v1/completions;
- the rbee worker's /execute and /v1/completions streams, and a warm `rbee infer`: first
  token and tokens/s as the client sees them and as the worker reports them;
- `rbee-hive worker spawn` until ready, against the in-process load;
- the worker's VRAM from /health against nvidia-smi's figure for its pid.

The streaming contenders are all loaded at once and answer in turn, round after round, so
a noisy machine slows them alike.

    python bench/gpu.py [--layers 22] [--max-tokens 256] [--runs 3]
    python bench/gpu.py --cpu [--layers 4]   # the same measurements on the CPU, smaller
    python bench/gpu.py --quick              # 2 layers, 16 tokens, one run (the CI smoke)

Without a CUDA device (NVML) or a llama build that offloads, it prints one line saying so
(a JSON document with "skipped") and exits 0.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from _common import (
    BIN,
    Sandbox,
    cuda_unavailable,
    emit,
    median,
    parser,
    ratio,
    worker_ttft_total_ms,
)
from stream import (
    PROMPT,
    InProcess,
    InProcessFailed,
    Sample,
    completions_once,
    infer_argv,
    infer_once,
    llama_server_running,
    summarise,
)

from tests.tinymodel import CYCLE, REALISTIC, write_model


def expected_text(n: int) -> str:
    """What the planted table makes of PROMPT: the cycle, from the letter after its last."""
    start = CYCLE.index(PROMPT[-1]) + 1
    return (CYCLE * (n // len(CYCLE) + 2))[start:start + n]


def inprocess_loads(model: Path, args: Any) -> list[float]:
    """The in-process load, `runs` times, each in a fresh process (as a worker's is)."""
    loads = []
    for _ in range(args.runs):
        child = InProcess(model, args)
        child.close()
        loads.append(child.load_ms)
    return loads


Run = tuple[Sample, dict[str, float]]  # a streamed answer, and the worker's own figures


def execute_once(url: str, token: str, args: Any) -> Run:
    """The worker's own protocol, read by rbee's own client (what `rbee infer` uses)."""
    from rbee_keeper.worker_client import execute

    body = {"prompt": PROMPT, "max_tokens": args.max_tokens, "temperature": 0,
            "job_id": f"bench-{time.monotonic_ns()}"}
    out = execute(url, token, body, lambda _t: None)
    assert out.end is not None and out.ttft_ms is not None
    sample = (out.ttft_ms, out.total_ms - out.ttft_ms, out.tokens, "".join(out.text))
    return sample, {"worker_ttft_ms": out.end["ttft_ms"],
                    "worker_tokens_per_sec": out.end["tokens_per_sec"]}


def v1_once(client: Any, url: str, token: str, args: Any) -> Run:
    """The worker's OpenAI route; its own first-token time comes from its /metrics."""
    before = worker_ttft_total_ms(url, token)
    sample = completions_once(client, url, args)
    return sample, {"worker_ttft_ms": worker_ttft_total_ms(url, token) - before}


def nvidia_smi_bytes(pid: int) -> int | None:
    """What nvidia-smi says the process holds on the GPU (None without nvidia-smi or entry)."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid) and fields[1].isdigit():
            return int(fields[1]) * 1024 * 1024
    return None


def spawn_runs(box: Sandbox, args: Any) -> tuple[dict[str, Any], dict[str, float]]:
    """`rbee-hive worker spawn` until ready, `runs` times; the last worker is kept."""
    spawn = ["rbee-hive", "worker", "spawn", args.backend, "--model", "bench", "--ctx",
             str(args.ctx)]
    ready, walls = [], []
    for i in range(args.runs):
        t0 = time.perf_counter()
        rec = box.json(*spawn)
        walls.append((time.perf_counter() - t0) * 1000)
        ready.append(rec["ready_s"] * 1000)
        if i < args.runs - 1:
            box.run("rbee-hive", "worker", "stop", rec["id"])
    return rec, {"spawn_to_ready_ms": median(ready), "spawn_command_wall_ms": median(walls)}


def vram(rec: dict[str, Any], args: Any) -> dict[str, Any]:
    from rbee_common.http import get_health

    health = (get_health(rec["url"]) or {}).get("vram_bytes")
    smi = nvidia_smi_bytes(rec["pid"]) if args.backend == "cuda" else None
    return {"health_bytes": health, "nvidia_smi_bytes": smi,
            "health_vs_nvidia_smi": ratio(health or 0, smi or 0)}


def side_by_side(box: Sandbox, model: Path, rec: dict[str, Any], args: Any) -> dict[str, Any]:
    """Every contender loaded at once, then one answer from each in turn, `runs` rounds after
    a warm-up round: a noisy machine then slows all of them alike."""
    import httpx

    token = box.run("rbee-hive", "worker", "token", rec["id"]).stdout.strip()
    failed: dict[str, dict[str, Any]] = {}
    try:
        baseline: InProcess | None = InProcess(model, args)
    except InProcessFailed as e:
        baseline, failed["llama_cpp_inprocess"] = None, said_failed(e)
    infer = infer_argv("bench", args)
    box.json(*infer)  # places the job on the idle worker spawned above, and remembers it
    with llama_server_running(model, args) as server_url, \
            httpx.Client(timeout=300) as plain, \
            httpx.Client(timeout=300, headers={"Authorization": f"Bearer {token}"}) as authed:
        contenders: dict[str, Any] = {
            "llama_cpp_inprocess": lambda: (baseline.once(), {}),
            "llama_cpp_server": lambda: (completions_once(plain, server_url, args), {}),
            "rbee_execute": lambda: execute_once(rec["url"], token, args),
            "rbee_v1_completions": lambda: v1_once(authed, rec["url"], token, args),
            "rbee_infer_warm": lambda: infer_once(box, infer, args),
        }
        for name in failed:
            del contenders[name]
        runs: dict[str, list[Run]] = {name: [] for name in contenders}
        for i in range(args.runs + 1):
            for name, once in list(contenders.items()):
                try:
                    run = once()
                except InProcessFailed as e:
                    failed[name] = said_failed(e)
                    del contenders[name], runs[name]
                    continue
                if i:
                    runs[name].append(run)
    if baseline is not None:
        baseline.close()
    return {**{name: {**summarise([r[0] for r in rs]),
                      **{k: median([r[1][k] for r in rs]) for k in rs[0][1]}}
               for name, rs in runs.items()}, **failed}


def said_failed(e: InProcessFailed) -> dict[str, Any]:
    """A contender that crashed: said on stderr at once, and kept in the results."""
    sys.stderr.write(f"{e}\n")
    return {"failed": str(e)}


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--cpu", action="store_true", help="measure on the CPU (use fewer --layers)")
    p.add_argument("--layers", type=int,
                   help=f"the model's layers (default {REALISTIC.n_layers}; 4 with --cpu, 2 with "
                        "--quick)")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    if args.model is not None:
        p.error("bench/gpu.py writes its own model (--layers sets its size)")
    reason = None if args.cpu else cuda_unavailable()
    if reason is not None:
        print(json.dumps({"benchmark": "gpu", "skipped": f"no CUDA here: {reason}"}))
        return
    args.backend, args.gpu_layers = ("cpu", 0) if args.cpu else ("cuda", -1)
    args.max_tokens = args.max_tokens or (32 if args.cpu else 256)
    args.layers = args.layers or (2 if args.quick else 4 if args.cpu else REALISTIC.n_layers)
    if args.quick:
        args.runs, args.max_tokens = 1, min(args.max_tokens, 16)
    with Sandbox() as box:
        shape = replace(REALISTIC, n_layers=args.layers)
        t0 = time.perf_counter()
        model = write_model(box.root / "bench.gguf", shape, name="rbee-bench-llama")
        written_s, size = time.perf_counter() - t0, model.stat().st_size
        box.run("rbee-hive", "models", "import", str(model), "--id", "bench")
        rec, spawned = spawn_runs(box, args)
        try:
            load: dict[str, Any] = {"inprocess_load_ms": median(inprocess_loads(model, args))}
        except InProcessFailed as e:
            load = {"inprocess_load_ms": None, "inprocess_load": said_failed(e)}
        results = side_by_side(box, model, rec, args)
        vram_doc = vram(rec, args)  # after serving: its compute buffers are in use too
    want = expected_text(24)
    for r in results.values():
        if "failed" not in r:
            r["text_ok"] = r["text_head"] == want[:len(r["text_head"])] and bool(r["text_head"])
    base = results["llama_cpp_inprocess"].get("tokens_per_sec") or 0
    in_ms = load["inprocess_load_ms"]
    spawn = {**spawned, **load, "ready_minus_inprocess_load_ms":
             None if in_ms is None else round(spawned["spawn_to_ready_ms"] - in_ms, 1)}
    emit({"benchmark": "gpu", "backend": args.backend, "n_gpu_layers": args.gpu_layers,
          "model": {"layers": args.layers, "n_embd": shape.n_embd, "dtype": shape.dtype,
                    "bytes": size, "written_s": round(written_s, 1)},
          "prompt": PROMPT, "max_tokens": args.max_tokens, "runs": args.runs,
          "results": results, "spawn": spawn, "vram": vram_doc,
          "ratios": {
              f"{name}_vs_inprocess_tokens_per_sec": ratio(r["tokens_per_sec"], base)
              for name, r in results.items()
              if name != "llama_cpp_inprocess" and "failed" not in r},
          "gpu": gpu_name() if args.backend == "cuda" else None}, args.out)


def gpu_name() -> str | None:
    from rbee_hive.devices import detect

    return next((d["name"] for d in detect()["devices"] if d["backend"] == "cuda"), None)


if __name__ == "__main__":
    sys.path.insert(0, str(BIN))
    main()
