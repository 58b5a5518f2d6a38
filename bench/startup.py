"""CLI start-up: `rbee --help`, `rbee-hive status --format json` and friends, against a bare
`python -c pass` measured in the same run.

    python bench/startup.py [--runs 10]
"""

from __future__ import annotations

import subprocess
import sys
import time

from _common import Sandbox, emit, median, parser, ratio

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "rbee --help": ["rbee", "--help"],
    "rbee hosts list --format json": ["rbee", "hosts", "list", "--format", "json"],
    "rbee-hive --version": ["rbee-hive", "--version"],
    "rbee-hive status --format json": ["rbee-hive", "status", "--format", "json"],
}
HEAVY = ("llama_cpp", "fastapi", "starlette", "uvicorn", "paramiko", "fabric", "httpx",
         "huggingface_hub", "gguf", "numpy")


def heavy_imports(box: Sandbox, code: str) -> list[str]:
    probe = f"import sys; {code}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=box.env, check=True)
    return out.stdout.split()


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--runs", type=int, default=10)
    args = p.parse_args()
    runs = 2 if args.quick else args.runs
    results = {}
    with Sandbox() as box:
        for name, argv in COMMANDS.items():
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                box.run(*argv)
                times.append((time.perf_counter() - t0) * 1000)
            results[name] = {"median_ms": median(times), "min_ms": round(min(times), 3)}
        base = results["python -c pass"]["median_ms"]
        for r in results.values():
            r["vs_bare_python"] = ratio(r["median_ms"], base)
        emit({"benchmark": "startup", "runs": runs, "results": results,
              "heavy_imports": {
                  "rbee-hive status": heavy_imports(
                      box, "from rbee_hive.status import status; status()"),
                  "rbee infer (module)": heavy_imports(box, "import rbee_keeper.cli"),
              }}, args.out)


if __name__ == "__main__":
    main()
