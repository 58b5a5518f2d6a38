"""Run every benchmark and collect their JSON into one document.

    python bench/run_all.py [--quick] [--model PATH.gguf] [--out bench/results/all.json]

--quick is the CI smoke: one short run of each, no thresholds, so benchmarks cannot rot.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# gpu: without CUDA it only says so; with CUDA its --quick run is a 2-layer model, briefly
BENCHMARKS = ["startup", "spawn", "stream", "ttft", "chat_template", "gpu", "e2e", "fanout",
              "download", "daemon", "queen", "split"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--only", help="comma-separated subset")
    args = p.parse_args()
    names = args.only.split(",") if args.only else BENCHMARKS
    results, failed = {}, []
    for name in names:
        argv = [sys.executable, str(HERE / f"{name}.py")]
        if args.quick:
            argv.append("--quick")
        if args.model and name in ("spawn", "stream", "ttft", "chat_template", "e2e", "split"):
            argv += ["--model", str(args.model)]
        t0 = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=HERE)
        took = round(time.monotonic() - t0, 1)
        if proc.returncode != 0:
            failed.append(name)
            sys.stderr.write(f"bench {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}\n")
            continue
        results[name] = json.loads(proc.stdout)
        sys.stderr.write(f"bench {name}: ok in {took}s\n")
    doc = {"quick": args.quick, "results": results, "failed": failed}
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
