"""Contract tests: the keys of every `--format json` document, pinned.

Scripts, the keeper (which reads a hive's documents) and the daemons (which serve the same
documents over HTTP) rely on these shapes; a key that appears or goes away must be a
decision, made here, not an accident of a refactor (pipx pins its result envelope the same
way). Lists are pinned by their first element; values are not pinned, only keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Env
from tests.helpers import run

Shape = dict[str, list[str]]
FREE_FORM = frozenset({"extra", "details"})  # GGUF metadata beyond the known keys; error details


def shape(doc: Any, path: str = ".") -> Shape:
    """{path: sorted keys} for every object in the document (a list's first element)."""
    out: Shape = {}
    if isinstance(doc, dict):
        out[path] = sorted(doc)
        for key, value in doc.items():
            if key not in FREE_FORM:
                out.update(shape(value, f"{path.rstrip('.')}.{key}"))
    elif isinstance(doc, list) and doc and isinstance(doc[0], dict | list):
        out.update(shape(doc[0], f"{path}[]"))
    return out


GGUF = ["architecture", "block_count", "context_length", "data_offset", "embedding_length",
        "extra", "file_type", "has_chat_template", "head_count", "head_count_kv",
        "kv_per_token", "name", "parameters", "tensor_count", "version", "vocab_size"]
ESTIMATE = ["ctx", "kv_bytes", "overhead_bytes", "total_bytes", "weights_bytes"]
MODEL_RECORD = ["added_at", "gguf", "id", "name", "path", "revision", "sha256", "shards", "size",
                "source"]
SHARD = ["path", "sha256", "size"]  # one file of a model (a split model has several)
WORKER_RECORD = ["backend", "created_at", "ctx", "device", "device_bytes", "devices",
                 "estimate_bytes", "host", "id", "log", "message", "model", "model_path", "pid",
                 "port", "ready_s", "rpc", "schema", "split", "state", "tensor_split", "url"]
SPLIT = ["bytes", "device", "share"]  # a worker's every device, RPC lenders first
LENDER_RECORD = ["backend", "cache_dir", "created_at", "device", "endpoint", "free_bytes",
                 "host", "id", "index", "insecure", "log", "memory_bytes", "message", "pid",
                 "port", "protocol", "ready_s", "schema", "state", "threads", "total_bytes"]
STATUS = {
    ".": ["backends", "devices", "host", "lenders", "models", "reserve_bytes", "schema",
          "workers"],
    ".host": ["hostname", "machine", "platform", "python", "rbee_home", "rbee_version"],
    ".backends[]": ["available", "name", "reason"],
    ".devices[]": ["backend", "cores", "index", "memory_free", "memory_limit", "memory_total",
                   "name"],
    ".models[]": ["architecture", "context_length", "data_offset", "file_type", "id",
                  "kv_per_token", "name", "parameters", "path", "sha256", "size", "source"],
    ".workers[]": WORKER_RECORD,
    ".workers[].split[]": SPLIT,
}
ERROR = {".": ["error"], ".error": ["code", "details", "hint", "message"]}
PLACEMENT = ["chosen", "ctx", "estimate", "path", "rejected"]
CHOSEN = ["backend", "device", "devices", "host", "reason", "split", "tensor_split", "worker"]
HOST_OUTCOME = ["elapsed_ms", "name", "ok"]


def nest(prefix: str, inner: Shape) -> Shape:
    """A shape re-rooted under `prefix` (a document inside another)."""
    return {prefix if k == "." else prefix + k: v for k, v in inner.items()}


def pinned_hive() -> dict[str, Shape]:
    return {
        "import": {".": sorted([*MODEL_RECORD, "schema"]), ".gguf": GGUF, ".shards[]": SHARD},
        "status": STATUS,
        "detect": {".": ["backends", "devices", "schema"],
                   ".backends[]": STATUS[".backends[]"], ".devices[]": STATUS[".devices[]"]},
        "catalog": {".": ["models", "schema"],
                    ".models[]": ["description", "downloaded", "id", "license", "name",
                                  "sha256", "size", "source", "ttl"]},
        "models list": {".": ["models", "schema"], ".models[]": MODEL_RECORD,
                        ".models[].gguf": GGUF, ".models[].shards[]": SHARD},
        "info": {".": sorted([*(k for k in MODEL_RECORD if k != "added_at"), "downloaded",
                              "estimate", "schema"]),
                 ".gguf": GGUF, ".estimate": ESTIMATE, ".shards[]": SHARD},
        "verify": {".": ["id", "ok", "schema", "sha256", "size"]},
        "spawn": {".": WORKER_RECORD, ".split[]": SPLIT},
        "worker list": {".": ["schema", "workers"], ".workers[]": WORKER_RECORD,
                        ".workers[].split[]": SPLIT},
        "health": {".": ["backend", "ctx", "device", "devices", "model", "rpc", "schema",
                         "split", "status", "uptime_s", "vram_bytes", "worker_id"],
                   ".split[]": SPLIT},
        "logs": {".": ["id", "lines", "schema"]},
        "token": {".": ["id", "schema", "token"]},
        "stop": {".": ["id", "model", "schema", "signal", "was"]},
        "stop all": {".": ["schema", "stopped"], ".stopped[]": ["id", "model", "schema",
                                                               "signal", "was"]},
        "rm": {".": ["freed_bytes", "id", "path", "removed", "schema"]},
        "error": ERROR,
    }


def hive_json(*args: str) -> Any:
    r = run("rbee-hive", *args, "--format", "json")
    assert r.returncode == 0, r
    return r.json()


def test_rbee_hive_documents_keep_their_keys(rbee_env: Env, tiny_model: Path) -> None:
    want = pinned_hive()
    got: dict[str, Shape] = {}
    got["import"] = shape(hive_json("models", "import", str(tiny_model), "--id", "tiny"))
    got["detect"] = shape(hive_json("detect"))
    got["catalog"] = shape(hive_json("models", "catalog"))
    got["models list"] = shape(hive_json("models", "list"))
    got["info"] = shape(hive_json("models", "info", "tiny"))
    got["verify"] = shape(hive_json("models", "verify", "tiny"))
    record = hive_json("worker", "spawn", "cpu", "--model", "tiny", "--threads", "1")
    got["spawn"] = shape(record)
    got["status"] = shape(hive_json("status"))
    got["worker list"] = shape(hive_json("worker", "list"))
    got["health"] = shape(hive_json("worker", "health", record["id"]))
    got["logs"] = shape(hive_json("worker", "logs", record["id"]))
    got["token"] = shape(hive_json("worker", "token", record["id"]))
    got["stop"] = shape(hive_json("worker", "stop", record["id"]))
    hive_json("worker", "spawn", "cpu", "--model", "tiny", "--threads", "1", "--no-wait")
    got["stop all"] = shape(hive_json("worker", "stop", "--all"))
    got["rm"] = shape(hive_json("models", "rm", "tiny"))
    err = run("rbee-hive", "models", "info", "nope-not-a-model", "--format", "json")
    assert err.returncode == 1
    got["error"] = shape(err.json())
    for name, expected in want.items():
        assert got[name] == expected, name


def rbee_json(*args: str, code: int = 0) -> Any:
    r = run("rbee", *args, "--format", "json")
    assert r.returncode == code, r
    return r.json()


def test_rbee_documents_keep_their_keys(rbee_env: Env, tiny_model: Path) -> None:
    r = run("rbee-hive", "models", "import", str(tiny_model), "--id", "tiny")
    assert r.returncode == 0, r
    got: dict[str, Shape] = {}
    got["hosts list"] = shape(rbee_json("hosts", "list"))
    got["hosts check"] = shape(rbee_json("hosts", "check"))
    args = ("infer", "-m", "tiny", "-p", "Hello", "--max-tokens", "3", "--temperature", "0")
    got["infer cold"] = shape(rbee_json(*args))
    got["infer warm"] = shape(rbee_json(*args))
    got["pool status"] = shape(rbee_json("pool", "status"))
    workers = rbee_json("workers", "list")
    got["workers list"] = shape(workers)
    got["workers stop"] = shape(rbee_json("workers", "stop", workers["workers"][0]["id"]))
    got["workers stop all"] = shape(rbee_json("workers", "stop", "--all"))
    got["hosts add"] = shape(rbee_json("hosts", "add", "mac", "--ssh", "me@mac.home.arpa"))
    got["hosts rm"] = shape(rbee_json("hosts", "rm", "mac"))
    got["error"] = shape(rbee_json("infer", "-m", "nope", "-p", "x", code=1))

    timings = ["stream_ms", "tokens_per_sec", "total_ms", "ttft_ms", "worker_ttft_ms"]
    infer_top = ["host", "job_id", "model", "placement", "prompt_tokens", "schema",
                 "stop_reason", "text", "timings", "tokens", "worker"]
    want: dict[str, Shape] = {
        "hosts list": {".": ["exists", "file", "hosts", "schema"],
                       ".hosts[]": ["address", "bind", "env_keys", "hive", "name", "ssh",
                                    "transport"]},
        "hosts check": {".": ["hosts", "schema", "status"],
                        ".hosts[]": sorted([*HOST_OUTCOME, "checks", "status"]),
                        ".hosts[].checks[]": ["check", "ok", "skipped"],
                        **nest(".hosts[].status", {k: v for k, v in STATUS.items()
                                                   if not k.startswith(".workers[]")})},
        "infer cold": {".": infer_top,
                       ".timings": sorted([*timings, "spawn_ms", "status_ms"]),
                       ".worker": ["backend", "device", "id", "url"],
                       ".placement": PLACEMENT, ".placement.chosen": CHOSEN,
                       ".placement.estimate": ESTIMATE},
        "infer warm": {".": infer_top, ".timings": timings,
                       ".worker": ["backend", "device", "id", "url"],
                       ".placement": PLACEMENT, ".placement.chosen": CHOSEN},
        "workers list": {".": ["hosts", "schema", "status", "workers"],
                         ".hosts[]": sorted([*HOST_OUTCOME, "workers"]),
                         ".hosts[].workers[]": WORKER_RECORD,
                         ".hosts[].workers[].split[]": SPLIT,
                         ".workers[]": WORKER_RECORD, ".workers[].split[]": SPLIT},
        "workers stop": {".": ["host", "id", "model", "schema", "signal", "was"]},
        "workers stop all": {".": ["hosts", "schema", "status", "stopped"],
                             ".hosts[]": sorted([*HOST_OUTCOME, "stopped"])},
        "hosts add": {".": ["action", "file", "name", "schema"]},
        "hosts rm": {".": ["action", "file", "name", "schema"]},
        "error": ERROR,
    }
    for name, expected in want.items():
        assert got[name] == expected, name
    assert got["pool status"] == {".": ["hosts", "schema", "status"],
                                  ".hosts[]": sorted([*HOST_OUTCOME, "status"]),
                                  **nest(".hosts[].status", STATUS)}


def test_rpc_documents_keep_their_keys(rbee_env: Env, tiny_model: Path) -> None:
    from rbee_common.rpc import rpc_supported

    if not rpc_supported():
        pytest.skip("this llama-cpp-python build has no RPC backend")
    hive_json("models", "import", str(tiny_model), "--id", "tiny")
    lender = hive_json("rpc", "start", "--device", "cpu:0", "--threads", "1")
    worker = hive_json("worker", "spawn", "cpu", "--model", "tiny", "--threads", "1", "--rpc",
                       lender["endpoint"])
    got = {"rpc start": shape(lender), "rpc list": shape(hive_json("rpc", "list")),
           "spawn --rpc": shape(worker), "status": shape(hive_json("status")),
           "rpc logs": shape(hive_json("rpc", "logs", lender["id"])),
           "stop all": shape(hive_json("worker", "stop", "--all"))}
    assert got == {
        "rpc start": {".": LENDER_RECORD},
        "rpc list": {".": ["lenders", "schema"], ".lenders[]": LENDER_RECORD},
        "spawn --rpc": {".": WORKER_RECORD, ".split[]": SPLIT},
        "status": {**STATUS, ".lenders[]": LENDER_RECORD},
        "rpc logs": {".": ["id", "lines", "schema"]},
        "stop all": {".": ["schema", "stopped"],
                     ".stopped[]": ["id", "model", "schema", "signal", "was"]},
    }
