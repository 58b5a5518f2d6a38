"""Time to first token as each client sees it, against the worker's own figure for the same
request (its time from starting the job to the first token, read off /metrics).

Clients: the openai SDK (what OpenAI apps use) streaming /v1/completions and
/v1/chat/completions; httpx; rbee's own client (`rbee infer`'s /execute stream); a client
that sends its request in one write on a fresh connection; and one that writes headers and
body apart, with Nagle on, over a keep-alive connection. Each runs in the same run against
two workers on the same model: as shipped ("tuned": TCP_NODELAY and TCP_QUICKACK on every
connection) and with uvicorn's stock protocol ("stock", the worker before that change).
Requests alternate between workers and clients, so machine noise falls on all alike.

    python bench/ttft.py [--model PATH.gguf] [--runs 20]
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import (
    BIN,
    ROOT,
    Sandbox,
    emit,
    median,
    model_path,
    parser,
    worker_ttft_total_ms,
)

PROMPT = "The capital of France is"
MAX_TOKENS = 4


class Worker:
    """One llm-worker-rbee process (no hive: the benchmark holds its token and port)."""

    def __init__(self, argv0: list[str], model: Path, log: Path, ctx: int) -> None:
        self.token = secrets.token_urlsafe(24)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(
                [*argv0, "--model", str(model), "--backend", "cpu", "--port", str(self.port),
                 "--worker-id", "bench", "--ctx", str(ctx), "--model-id", "bench"],
                env={**os.environ, "RBEE_WORKER_TOKEN": self.token}, stdout=f, stderr=f)
        from rbee_common.http import get_health

        deadline = time.monotonic() + 120
        while (get_health(self.url) or {}).get("status") != "ready":
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)

    def ttft_total_ms(self) -> float:
        return worker_ttft_total_ms(self.url, self.token)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _raw_request(w: Worker) -> tuple[bytes, bytes]:
    body = json.dumps({"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}).encode()
    head = (f"POST /execute HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {w.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head, body


def _read_stream(sock: socket.socket, t0: float) -> float:
    buf, first = b"", 0.0
    while not buf.endswith(b"\r\n0\r\n\r\n"):
        data = sock.recv(65536)
        if not data:
            raise RuntimeError(f"the worker closed the stream: {buf[-300:]!r}")
        buf += data
        if not first and b"event: token" in buf:
            first = (time.perf_counter() - t0) * 1000
    return first


Mark = Callable[[], None]


def clients(w: Worker) -> dict[str, Callable[[Mark], float]]:
    """Each client's request, returning its time to first token (ms); each calls `mark()`
    just before the request it times."""
    import httpx
    import openai

    from rbee_keeper import worker_client

    sdk = openai.OpenAI(base_url=f"{w.url}/v1", api_key=w.token, max_retries=0)
    hx = httpx.Client(timeout=60, headers={"Authorization": f"Bearer {w.token}"})

    def sdk_completions(mark: Mark) -> float:
        mark()
        t0 = time.perf_counter()
        first = 0.0
        for chunk in sdk.completions.create(model="bench", prompt=PROMPT, max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True):
            if not first and chunk.choices and chunk.choices[0].text:
                first = (time.perf_counter() - t0) * 1000
        return first

    def sdk_chat(mark: Mark) -> float:
        mark()
        t0 = time.perf_counter()
        first = 0.0
        for chunk in sdk.chat.completions.create(
                model="bench", messages=[{"role": "user", "content": PROMPT}],
                max_tokens=MAX_TOKENS, temperature=0, stream=True):
            if not first and chunk.choices and chunk.choices[0].delta.content:
                first = (time.perf_counter() - t0) * 1000
        return first

    def httpx_completions(mark: Mark) -> float:
        body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
        mark()
        t0 = time.perf_counter()
        first = 0.0
        with hx.stream("POST", f"{w.url}/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if (not first and line.startswith("data: {")
                        and json.loads(line[6:])["choices"][0]["text"]):
                    first = (time.perf_counter() - t0) * 1000
        return first

    def rbee_execute(mark: Mark) -> float:
        body = {"job_id": f"b{secrets.token_hex(4)}", "prompt": PROMPT,
                "max_tokens": MAX_TOKENS, "temperature": 0}
        mark()
        out = worker_client.execute(w.url, w.token, body, lambda _t: None)
        return float(out.ttft_ms or 0.0)

    def one_write(mark: Mark) -> float:
        head, body = _raw_request(w)
        mark()
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", w.port)) as sock:
            sock.sendall(head + body)
            return _read_stream(sock, t0)

    def two_writes_keepalive(mark: Mark) -> float:
        head, body = _raw_request(w)
        # Nagle stays on, as in a client that never sets TCP_NODELAY; the connection has
        # just answered a request, as a keep-alive connection in use has
        with socket.create_connection(("127.0.0.1", w.port)) as sock:
            sock.sendall(head + body)
            _read_stream(sock, time.perf_counter())
            mark()
            t0 = time.perf_counter()
            sock.sendall(head)
            sock.sendall(body)
            return _read_stream(sock, t0)

    return {"openai_sdk_completions": sdk_completions, "openai_sdk_chat": sdk_chat,
            "httpx_completions": httpx_completions, "rbee_execute": rbee_execute,
            "one_write_execute": one_write, "two_writes_keepalive_execute": two_writes_keepalive}


def sample(w: Worker, client: Callable[[Mark], float]) -> tuple[float, float]:
    """One request: (time to first token as the client saw it, as the worker saw it)."""
    before: list[float] = []
    seen = client(lambda: before.append(w.ttft_total_ms()))
    return seen, w.ttft_total_ms() - before[0]


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--ctx", type=int, default=2048)
    args = p.parse_args()
    runs = 1 if args.quick else args.runs
    with Sandbox() as box:
        model = model_path(args.model, box.root)
        workers = {
            "tuned": Worker([str(BIN / "llm-worker-rbee")], model, box.root / "tuned.log",
                            args.ctx),
            "stock": Worker([sys.executable, str(ROOT / "bench" / "_untuned_worker.py")], model,
                            box.root / "stock.log", args.ctx),
        }
        try:
            calls = {name: clients(w) for name, w in workers.items()}
            t0 = time.perf_counter()
            calls["tuned"]["openai_sdk_completions"](lambda: None)  # its first call in a process
            sdk_first_call = (time.perf_counter() - t0) * 1000
            samples: dict[str, dict[str, list[tuple[float, float]]]] = {
                v: {c: [] for c in calls[v]} for v in workers}
            for i in range(runs + 1):
                for client in calls["tuned"]:
                    for variant, w in workers.items():
                        seen_own = sample(w, calls[variant][client])
                        if i:  # the first round warms every path
                            samples[variant][client].append(seen_own)
        finally:
            for w in workers.values():
                w.stop()
    results: dict[str, Any] = {}
    for variant, per_client in samples.items():
        results[variant] = {c: {
            "client_ttft_ms": median([s[0] for s in ss]),
            "worker_ttft_ms": median([s[1] for s in ss]),
            "gap_ms": median([s[0] - s[1] for s in ss]),
            "client_ttft_min_ms": round(min(s[0] for s in ss), 3),
        } for c, ss in per_client.items()}
    emit({"benchmark": "ttft", "model": str(model), "prompt": PROMPT, "runs": runs,
          "openai_sdk_first_call_ms": round(sdk_first_call, 1), "results": results}, args.out)


if __name__ == "__main__":
    main()
