"""End to end: cold `rbee infer` split into its parts (status, header probe, download,
worker spawn and load, first token, decode) and warm `rbee infer`, against the same
generation in-process (model load, first token, generation) measured in the same run.

    python bench/e2e.py [--model PATH.gguf] [--ssh] [--max-tokens 64] [--runs 5]

The model is served by a loopback Hugging Face server, so "cold" includes a real download.
With --ssh the pool is one loopback sshd host instead of this machine's local transport.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from _common import BIN, Sandbox, emit, median, model_path, parser, ratio

from tests.hubserver import HubServer
from tests.sshd import SshLab

PROMPT = "The capital of France is"
PARTS = ("status_ms", "probe_ms", "download_ms", "spawn_ms", "ttft_ms")


def inprocess(model: Path, max_tokens: int, ctx: int) -> dict[str, float]:
    import llama_cpp

    from worker.engine import extra_buffer_types_wanted, model_params

    t0 = time.perf_counter()
    with model_params(use_extra_bufts=extra_buffer_types_wanted("cpu")):
        llm = llama_cpp.Llama(str(model), n_ctx=ctx, n_threads=os.cpu_count(), verbose=False)
    load = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    first = 0.0
    for chunk in llm.create_completion(PROMPT, max_tokens=max_tokens, temperature=0.0,
                                       stream=True):
        if chunk["choices"][0]["text"] and not first:
            first = (time.perf_counter() - t0) * 1000
    generate = (time.perf_counter() - t0) * 1000
    llm.close()
    return {"load_ms": round(load, 2), "ttft_ms": round(first, 2),
            "generate_ms": round(generate, 2)}


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--ssh", action="store_true", help="one loopback sshd host")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--ctx", type=int, default=2048)
    args = p.parse_args()
    if args.quick:
        args.runs, args.max_tokens = 1, 16
    hub = HubServer().start()
    try:
        with Sandbox() as box:
            model = model_path(args.model, box.root)
            hub.add_repo_file("bench/Model-GGUF", "model.gguf", model.read_bytes())
            box.env["HF_ENDPOINT"] = hub.url
            (box.root / "config" / "catalog.toml").write_text(
                '[[models]]\nid = "bench"\nname = "bench"\n'
                'source = "hf:bench/Model-GGUF/model.gguf"\n')
            host_home = box.root / "rbee-home"
            if args.ssh:
                lab = SshLab(box.root, box.root / "home", box.root / "config" / "hosts.toml",
                             str(BIN / "rbee-hive"))
                box.defer(lab.close)  # stops the host's workers while its state still exists
                os.environ["HF_ENDPOINT"] = hub.url
                host_home = lab.rbee_home(lab.start(1)[0])
            infer = ["rbee", "infer", "--model", "bench", "--prompt", PROMPT, "--max-tokens",
                     str(args.max_tokens), "--temperature", "0", "--ctx", str(args.ctx)]
            cold: list[dict[str, Any]] = []
            for _ in range(args.runs):
                box.run("rbee-hive", "worker", "stop", "--all", RBEE_HOME=str(host_home))
                box.run("rbee-hive", "models", "rm", "bench", check=False,
                        RBEE_HOME=str(host_home))
                (box.root / "config" / "workers.json").unlink(missing_ok=True)
                t0 = time.perf_counter()
                doc = box.json(*infer)
                wall = (time.perf_counter() - t0) * 1000
                assert doc["placement"]["path"] == "cold", doc["placement"]
                t = doc["timings"]
                cold.append({"wall_ms": wall, "decode_ms": t["stream_ms"] - t["ttft_ms"],
                             **{k: t.get(k, 0.0) for k in PARTS}})
            warm = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                doc = box.json(*infer)
                warm.append({"wall_ms": (time.perf_counter() - t0) * 1000,
                             "ttft_ms": doc["timings"]["ttft_ms"],
                             "total_ms": doc["timings"]["total_ms"],
                             "decode_ms": doc["timings"]["stream_ms"] - doc["timings"]["ttft_ms"]})
            base = inprocess(model, args.max_tokens, args.ctx)
    finally:
        hub.stop()
    cold_m = {k: median([c[k] for c in cold]) for k in cold[0]}
    warm_m = {k: median([w[k] for w in warm]) for k in warm[0]}
    emit({"benchmark": "e2e", "model": str(model), "transport": "ssh" if args.ssh else "local",
          "max_tokens": args.max_tokens, "runs": args.runs, "cold": cold_m, "warm": warm_m,
          "inprocess": base, "ratios": {
              "warm_wall_vs_inprocess_generate": ratio(warm_m["wall_ms"], base["generate_ms"]),
              "warm_overhead_ms": round(warm_m["wall_ms"] - base["generate_ms"], 1),
              "cold_wall_vs_inprocess_load_and_generate": ratio(
                  cold_m["wall_ms"], base["load_ms"] + base["generate_ms"]),
          }}, args.out)


if __name__ == "__main__":
    main()
