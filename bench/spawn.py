"""Worker spawn-to-ready: `rbee-hive worker spawn` until /health says ready, per model,
against loading the same model in-process with llama-cpp-python in the same run, and where
the time goes: interpreter start, the imports (what the worker imports before its load
starts; llama_cpp; the HTTP stack: pydantic, starlette, sse-starlette, uvicorn) and the
model's first load in a fresh process. Their sum is what a worker that did them one after
the other would take; the worker overlaps the load with the HTTP stack's imports. The hive
polls /health every 50 ms (rbee_hive.workers.wait_ready), 25 ms on average on top.

    python bench/spawn.py [--model PATH.gguf] [--runs 5]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from _common import Sandbox, emit, median, model_path, parser, ratio

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


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--ctx", type=int, default=2048)
    args = p.parse_args()
    runs = 1 if args.quick else args.runs
    parts: dict[str, list[float]] = {k: [] for k in (
        "python_start_ms", "import_worker_start_ms", "import_llama_cpp_ms",
        "import_http_stack_ms", "inprocess_first_load_ms")}
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
        "where_the_time_goes": {**where, "sum_of_parts_ms": round(serial, 1),
                                "ready_minus_sum_of_parts_ms": round(median(ready) - serial, 1)}},
        args.out)


if __name__ == "__main__":
    main()
