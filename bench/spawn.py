"""Worker spawn-to-ready: `rbee-hive worker spawn` until /health says ready, per model,
against loading the same model in-process with llama-cpp-python in the same run, and where
the time goes: interpreter start, the imports (llama_cpp; the HTTP stack: pydantic,
starlette, sse-starlette, uvicorn), the model's first load in a fresh process, the worker
on its own (started here and polled every 5 ms) and the hive around it.

    python bench/spawn.py [--model PATH.gguf] [--runs 5]
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time

from _common import BIN, Sandbox, emit, median, model_path, parser, ratio

# what a worker imports before its load starts, and what it imports while the model loads
WORKER_START = "import worker.cli, worker.engine, worker.server"
HTTP_STACK = "import worker.app, uvicorn, sse_starlette"


def fresh_ms(code: str, env: dict[str, str]) -> float:
    """Run `code` in a fresh interpreter; it prints the milliseconds it measured."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    return float(out.stdout.split()[-1])


def timed_import(statement: str) -> str:
    return ("import time; t0 = time.perf_counter(); " + statement +
            "; print((time.perf_counter() - t0) * 1000)")


def first_load(model: str, ctx: int) -> str:
    return ("import os, time, llama_cpp\n"
            "from worker.engine import extra_buffer_types_wanted, model_params\n"
            "t0 = time.perf_counter()\n"
            "with model_params(use_extra_bufts=extra_buffer_types_wanted('cpu')):\n"
            f"    llama_cpp.Llama({model!r}, n_ctx={ctx}, n_threads=os.cpu_count(),"
            " verbose=False)\n"
            "print((time.perf_counter() - t0) * 1000)")


def direct_ready_ms(model: str, ctx: int, env: dict[str, str]) -> float:
    """The worker alone: from its start to /health saying ready, polled every 5 ms."""
    from rbee_common.http import get_health

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [str(BIN / "llm-worker-rbee"), "--model", model, "--backend", "cpu", "--port",
         str(port), "--worker-id", "bench", "--ctx", str(ctx)],
        env={**env, "RBEE_WORKER_TOKEN": secrets.token_urlsafe(24)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while (get_health(f"http://127.0.0.1:{port}") or {}).get("status") != "ready":
            if proc.poll() is not None:
                raise RuntimeError("the worker exited before it was ready")
            time.sleep(0.005)
        return (time.perf_counter() - t0) * 1000
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--ctx", type=int, default=2048)
    args = p.parse_args()
    runs = 1 if args.quick else args.runs
    parts: dict[str, list[float]] = {k: [] for k in (
        "python_start_ms", "import_worker_start_ms", "import_llama_cpp_ms",
        "import_http_stack_ms", "inprocess_first_load_ms", "direct_ready_ms")}
    with Sandbox() as box:
        model = model_path(args.model, box.root)
        box.run("rbee-hive", "models", "import", str(model), "--id", "bench")
        ready, walls = [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            rec = box.json("rbee-hive", "worker", "spawn", "cpu", "--model", "bench",
                           "--ctx", str(args.ctx))
            walls.append((time.perf_counter() - t0) * 1000)
            ready.append(rec["ready_s"] * 1000)
            box.run("rbee-hive", "worker", "stop", rec["id"])
            # the parts, interleaved with the spawns so that machine noise falls on all alike
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], env=box.env, check=True)
            parts["python_start_ms"].append((time.perf_counter() - t0) * 1000)
            parts["import_worker_start_ms"].append(fresh_ms(timed_import(WORKER_START), box.env))
            parts["import_llama_cpp_ms"].append(fresh_ms(timed_import("import llama_cpp"),
                                                         box.env))
            parts["import_http_stack_ms"].append(fresh_ms(timed_import(HTTP_STACK), box.env))
            parts["inprocess_first_load_ms"].append(fresh_ms(first_load(str(model), args.ctx),
                                                             box.env))
            parts["direct_ready_ms"].append(direct_ready_ms(str(model), args.ctx, box.env))
        import llama_cpp

        from worker.engine import extra_buffer_types_wanted, model_params

        loads = []
        for _ in range(runs):
            t0 = time.perf_counter()
            with model_params(use_extra_bufts=extra_buffer_types_wanted("cpu")):
                llm = llama_cpp.Llama(str(model), n_ctx=args.ctx, n_threads=os.cpu_count(),
                                      verbose=False)
            loads.append((time.perf_counter() - t0) * 1000)
            llm.close()
    where = {k: median(v) for k, v in parts.items()}
    serial = sum(where[k] for k in ("python_start_ms", "import_worker_start_ms",
                                    "import_llama_cpp_ms", "import_http_stack_ms",
                                    "inprocess_first_load_ms"))
    emit({"benchmark": "spawn", "model": str(model), "runs": runs, "results": {
        "spawn_to_ready_ms": median(ready), "spawn_command_wall_ms": median(walls),
        "inprocess_load_ms": median(loads),
        "ready_vs_inprocess_load": ratio(median(ready), median(loads)),
        "ready_minus_inprocess_load_ms": round(median(ready) - median(loads), 1)},
        "where_the_time_goes": {
            **where, "sum_of_parts_ms": round(serial, 1),
            "hive_overhead_ms": round(median(ready) - where["direct_ready_ms"], 1)}},
        args.out)


if __name__ == "__main__":
    main()
