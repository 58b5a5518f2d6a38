"""Worker spawn-to-ready: `rbee-hive worker spawn` until /health says ready, per model,
against loading the same model in-process with llama-cpp-python in the same run.

    python bench/spawn.py [--model PATH.gguf] [--runs 5]
"""

from __future__ import annotations

import os
import time

from _common import Sandbox, emit, median, model_path, parser, ratio


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--ctx", type=int, default=2048)
    args = p.parse_args()
    runs = 1 if args.quick else args.runs
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
    emit({"benchmark": "spawn", "model": str(model), "runs": runs, "results": {
        "spawn_to_ready_ms": median(ready), "spawn_command_wall_ms": median(walls),
        "inprocess_load_ms": median(loads),
        "ready_vs_inprocess_load": ratio(median(ready), median(loads))}}, args.out)


if __name__ == "__main__":
    main()
