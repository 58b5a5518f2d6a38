"""One model split across a worker and an RPC lender on loopback, against the same model on
the worker alone, side by side in one run: tokens/s and time to first token (each worker's
/execute read by rbee's own client), load time (the worker's own figure from its log, and
spawn until ready), the same through the controller's tunnel relay, and what a lender's
--cache-dir saves on the next load (llama.cpp caches
tensors over 10 MiB, so only a realistic model gains).

Models: the tiny test model, and a realistic one: --model PATH, else TinyLlama 1.1B's layer
shape (tests/tinymodel.REALISTIC) cut to --layers layers in F16, written here. Every process
gets --threads threads (default 1: worker and lender share this machine's cores). --quick is
the CI smoke: the tiny model only, briefly.

    python bench/split.py [--model PATH.gguf] [--layers 4] [--max-tokens 64] [--runs 3] [--ssh]
"""

from __future__ import annotations

import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from _common import BIN, Sandbox, emit, median, parser, ratio

PROMPT = "The capital of France is"
_LOADED = re.compile(r"the model took ([\d.]+) s to load")


def load_ms(rec: dict[str, Any]) -> float:
    """The worker's own load time, from its log's ready line."""
    found = _LOADED.findall(Path(rec["log"]).read_text())
    return round(float(found[-1]) * 1000, 1) if found else float("nan")


def generate(box: Sandbox, rec: dict[str, Any], args: Any) -> list[dict[str, Any]]:
    from rbee_keeper.worker_client import execute

    token = box.json("rbee-hive", "worker", "token", rec["id"])["token"]
    out = []
    for _ in range(args.runs):
        body = {"prompt": PROMPT, "max_tokens": args.max_tokens, "temperature": 0,
                "job_id": f"bench-{time.monotonic_ns()}"}
        stream = execute(rec["url"], token, body, lambda _t: None)
        assert stream.end is not None, "the stream ended without its end event"
        out.append({"ttft_ms": stream.ttft_ms, "tokens": stream.tokens,
                    "tokens_per_sec": stream.end["tokens_per_sec"],
                    "worker_ttft_ms": stream.end["ttft_ms"], "text": "".join(stream.text)})
    return out


def spawn(box: Sandbox, args: Any, *extra: str) -> tuple[dict[str, Any], float, float]:
    """A worker, spawn-until-ready in ms, and its own load time in ms."""
    t0 = time.perf_counter()
    rec = box.json("rbee-hive", "worker", "spawn", "cpu", "--model", "bench", "--threads",
                   str(args.threads), "--ctx", "2048", *extra)
    return rec, (time.perf_counter() - t0) * 1000, load_ms(rec)


def summary(runs: list[dict[str, Any]], loads: list[float], ready: list[float]
            ) -> dict[str, Any]:
    return {"tokens_per_sec": median([r["tokens_per_sec"] for r in runs]),
            "ttft_ms": median([r["ttft_ms"] for r in runs]),
            "worker_ttft_ms": median([r["worker_ttft_ms"] for r in runs]),
            "load_ms": loads, "spawn_ready_ms": [round(x, 1) for x in ready],
            "runs": len(runs), "text_head": runs[-1]["text"][:32] if runs else ""}


def one_model(model: Path, args: Any) -> dict[str, Any]:
    with Sandbox() as box:
        box.run("rbee-hive", "models", "import", str(model), "--id", "bench")
        lender_args = ("rbee-hive", "rpc", "start", "--device", "cpu:0", "--threads",
                       str(args.threads))

        rec, took, load = spawn(box, args)
        local_runs = generate(box, rec, args)
        local = summary(local_runs, [load], [took])
        box.run("rbee-hive", "worker", "stop", rec["id"])

        # through a lender without a cache: the first load and the next
        lender = box.json(*lender_args)
        split_rec, took, load = spawn(box, args, "--rpc", lender["endpoint"])
        runs = generate(box, split_rec, args)
        box.run("rbee-hive", "worker", "stop", split_rec["id"])
        again, took2, load2 = spawn(box, args, "--rpc", lender["endpoint"])
        split = summary(runs, [load, load2], [took, took2])
        box.run("rbee-hive", "worker", "stop", again["id"])

        # the same lender through the controller's relay (rbee_keeper.tunnel, what a split
        # across hosts goes through; here both ends are local sockets, so SSH's own
        # encryption is not in the figure)
        from rbee_keeper.tunnel import LocalSide, Tunnels

        with Tunnels() as tunnels:
            port = tunnels.forward(LocalSide("worker"), LocalSide("lender"), lender["port"])
            rec, took, load = spawn(box, args, "--rpc", f"127.0.0.1:{port}")
            relayed = summary(generate(box, rec, args), [load], [took])
            box.run("rbee-hive", "worker", "stop", rec["id"])
        box.run("rbee-hive", "rpc", "stop", lender["id"])

        # through a lender with a cache dir: the first load fills it, the next reads it
        cache = box.root / "rpc-cache"
        lender = box.json(*lender_args, "--cache-dir", str(cache))
        rec, took, load = spawn(box, args, "--rpc", lender["endpoint"])
        box.run("rbee-hive", "worker", "stop", rec["id"])
        again, took2, load2 = spawn(box, args, "--rpc", lender["endpoint"])
        cached = summary(generate(box, again, args), [load, load2], [took, took2])
        cached["cache_bytes"] = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
        box.run("rbee-hive", "worker", "stop", again["id"])
        box.run("rbee-hive", "rpc", "stop", lender["id"])
    return {
        "model": model.name, "size_bytes": model.stat().st_size,
        "split": split_rec["split"], "local": local, "split_uncached": split,
        "split_cached": cached, "split_relayed": relayed,
        "same_greedy_text": runs[0]["text"] == local_runs[0]["text"],
        "ratios": {
            "split_vs_local_tokens_per_sec": ratio(split["tokens_per_sec"],
                                                   local["tokens_per_sec"]),
            "split_vs_local_ttft": ratio(split["ttft_ms"], local["ttft_ms"]),
            "split_vs_local_load": ratio(split["load_ms"][0], local["load_ms"][0]),
            "cached_vs_uncached_next_load": ratio(cached["load_ms"][1], split["load_ms"][1]),
            "relayed_vs_direct_tokens_per_sec": ratio(relayed["tokens_per_sec"],
                                                      split["tokens_per_sec"]),
            "relayed_vs_direct_load": ratio(relayed["load_ms"][0], split["load_ms"][0]),
        },
    }


def over_ssh(model: Path, args: Any) -> dict[str, Any]:
    """`rbee infer --split h1,h2` against `rbee infer --host h1` on two loopback sshd hosts:
    the whole path (lender started over SSH, tunnelled through this controller, the worker
    loading through the tunnel), and with --insecure-rpc (no tunnel); all cold every run (a
    split worker ends with its job)."""
    import os

    from tests.hubserver import HubServer
    from tests.sshd import SshLab

    hub = HubServer().start()
    try:
        with Sandbox() as box:
            hub.add_repo_file("bench/Model-GGUF", "model.gguf", model.read_bytes())
            box.env["HF_ENDPOINT"] = os.environ["HF_ENDPOINT"] = hub.url
            (box.root / "config" / "catalog.toml").write_text(
                '[[models]]\nid = "bench"\nname = "bench"\n'
                'source = "hf:bench/Model-GGUF/model.gguf"\n')
            lab = SshLab(box.root, box.root / "home", box.root / "config" / "hosts.toml",
                         str(BIN / "rbee-hive"))
            box.defer(lab.close)
            h1 = lab.start(2)[0]
            infer = ["rbee", "infer", "--model", "bench", "--prompt", PROMPT, "--max-tokens",
                     str(args.max_tokens), "--temperature", "0", "--ctx", "2048"]
            box.json(*infer, "--host", "h1")  # the download, once
            rows: dict[str, list[dict[str, Any]]] = {"single": [], "split": [], "direct": []}
            kinds = (("single", ["--host", "h1"]), ("split", ["--split", "h1,h2"]),
                     ("direct", ["--split", "h1,h2", "--insecure-rpc"]))
            for _ in range(args.runs):
                for kind, extra in kinds:
                    box.run("rbee-hive", "worker", "stop", "--all",
                            RBEE_HOME=str(lab.rbee_home(h1)))
                    (box.root / "config" / "workers.json").unlink(missing_ok=True)
                    t0 = time.perf_counter()
                    doc = box.json(*infer, *extra)
                    t = doc["timings"]
                    rows[kind].append({"wall_ms": (time.perf_counter() - t0) * 1000,
                                       "spawn_ms": t.get("spawn_ms", 0.0),
                                       "ttft_ms": t["ttft_ms"],
                                       "tokens_per_sec": t["tokens_per_sec"],
                                       "text": doc["text"]})
    finally:
        hub.stop()
    m = {k: {f: median([r[f] for r in v]) for f in ("wall_ms", "spawn_ms", "ttft_ms",
                                                      "tokens_per_sec")}
         for k, v in rows.items()}
    return {"model": model.name, "runs": args.runs, **m,
            "same_greedy_text": rows["split"][0]["text"] == rows["single"][0]["text"],
            "ratios": {"split_vs_single_tokens_per_sec": ratio(m["split"]["tokens_per_sec"],
                                                               m["single"]["tokens_per_sec"]),
                       "split_vs_single_spawn": ratio(m["split"]["spawn_ms"],
                                                      m["single"]["spawn_ms"]),
                       "split_vs_single_wall": ratio(m["split"]["wall_ms"],
                                                     m["single"]["wall_ms"]),
                       "direct_vs_single_tokens_per_sec": ratio(
                           m["direct"]["tokens_per_sec"], m["single"]["tokens_per_sec"]),
                       "direct_vs_single_spawn": ratio(m["direct"]["spawn_ms"],
                                                       m["single"]["spawn_ms"])}}


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--layers", type=int, default=4, help="layers of the realistic model")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3, choices=range(1, 101), metavar="N")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ssh", action="store_true",
                   help="also the whole `rbee infer --split` path over two loopback sshd hosts")
    args = p.parse_args()
    if args.quick:
        args.runs, args.max_tokens = 1, 16
    from rbee_common.rpc import rpc_supported

    if not rpc_supported():
        emit({"benchmark": "split", "skipped": "this llama-cpp-python build has no RPC "
                                               "backend"}, args.out)
        return
    from tests.tinymodel import REALISTIC, write_model, write_tiny_model

    with Sandbox() as scratch:
        models = [write_tiny_model(scratch.root / "tiny.gguf")]
        if args.model is not None:
            models.append(args.model.resolve())
        elif not args.quick:
            shape = replace(REALISTIC, n_layers=args.layers)
            models.append(write_model(scratch.root / f"realistic-{args.layers}l.gguf", shape))
        results = {m.stem: one_model(m, args) for m in models}
        ssh = {m.stem: over_ssh(m, args) for m in models} if args.ssh else None
    emit({"benchmark": "split", "threads": args.threads, "max_tokens": args.max_tokens,
          "prompt": PROMPT, "models": results, "over_ssh": ssh}, args.out)


if __name__ == "__main__":
    main()
