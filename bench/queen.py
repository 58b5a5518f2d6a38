"""The queen's cost, measured against talking to the worker directly, in one run:

- time to first token through the queen's OpenAI gateway vs straight to the worker's own
  /v1/completions (warm: the worker is already loaded), streamed, as the client sees it;
- the queen's added latency per request (total time, queen − direct) at 1, 8 and 32
  concurrent clients (the worker runs one job at a time, so both sides queue alike);
- the time from "model loaded nowhere" to the first token, through the queen.

    python bench/queen.py [--model PATH.gguf] [--tokens 16] [--rounds 5] [--quick]
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from _common import Sandbox, emit, median, model_path, parser, ratio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stream_ttft(url: str, token: str, model: str, tokens: int) -> tuple[float, float]:
    """(first token ms, total ms) of one streamed completion, as an httpx client sees it."""
    import httpx

    t0 = time.perf_counter()
    first = None
    body = {"model": model, "prompt": "Hello", "max_tokens": tokens, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300,
                      headers={"Authorization": f"Bearer {token}"}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if first is None and line.startswith("data:") and '"text": "' in line \
                    and '"text": ""' not in line:
                first = time.perf_counter()
    end = time.perf_counter()
    return ((first or end) - t0) * 1000, (end - t0) * 1000


def concurrent(url: str, token: str, model: str, tokens: int, clients: int) -> float:
    """Median total ms per request with `clients` asking at once."""
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(lambda _: stream_ttft(url, token, model, tokens)[1],
                                range(clients)))
    return median(results)


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    rounds = 2 if args.quick else args.rounds
    levels = [1, 8] if args.quick else [1, 8, 32]
    with Sandbox() as box:
        model = model_path(args.model, box.root)
        box.run("rbee-hive", "models", "import", str(model), "--id", "bench")
        port = free_port()
        log = open(box.root / "queen.log", "ab")  # noqa: SIM115 (closed with the sandbox)
        queen = subprocess.Popen([sys.executable, "-m", "rbee_keeper.queen", "--port",
                                  str(port)], env=box.env, stdout=log, stderr=log)
        box.defer(lambda: (queen.terminate(), queen.wait(timeout=20)))
        qurl = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                token = (box.root / "config" / "queen.token").read_text().strip()
                import httpx

                if httpx.get(f"{qurl}/health", timeout=1).status_code == 200:
                    break
            except (OSError, Exception):  # not up yet
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the queen did not start")
            time.sleep(0.05)
        cold_ttft, _ = stream_ttft(qurl, token, "bench", args.tokens)  # loaded nowhere yet
        state: dict[str, Any] = httpx.get(f"{qurl}/v2/state", timeout=10,
                                          headers={"Authorization": f"Bearer {token}"}).json()
        (worker,) = state["workers"]
        wtoken = box.run("rbee-hive", "worker", "token", worker["id"]).stdout.strip()
        wurl = worker["url"]
        via_queen, direct = [], []
        for _ in range(rounds):
            via_queen.append(stream_ttft(qurl, token, "bench", args.tokens))
            direct.append(stream_ttft(wurl, wtoken, "bench", args.tokens))
        added = {}
        for clients in levels:
            q = concurrent(qurl, token, "bench", args.tokens, clients)
            d = concurrent(wurl, wtoken, "bench", args.tokens, clients)
            added[str(clients)] = {"queen_ms": q, "direct_ms": d,
                                   "added_ms": round(q - d, 2), "ratio": ratio(q, d)}
    q_ttft = median([t for t, _ in via_queen])
    d_ttft = median([t for t, _ in direct])
    emit({"benchmark": "queen", "model": str(model), "tokens": args.tokens, "rounds": rounds,
          "cpus": os.cpu_count(), "results": {
              "ttft_via_queen_ms": q_ttft, "ttft_direct_ms": d_ttft,
              "ttft_added_ms": round(q_ttft - d_ttft, 2),
              "total_via_queen_ms": median([t for _, t in via_queen]),
              "total_direct_ms": median([t for _, t in direct]),
              "concurrent": added,
              "cold_to_first_token_ms": round(cold_ttft, 1)}}, args.out)


if __name__ == "__main__":
    main()
