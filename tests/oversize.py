"""A context size that no device can hold, derived from the device's total memory: a free
figure read a moment earlier can race with a worker that is still letting go of its memory,
and a fixed --ctx fits on a big enough machine."""

from __future__ import annotations

from rbee_common.estimate import KV_BYTES_PER_ELEMENT
from tests.helpers import run


def ctx_beyond(model_id: str, memory_total: int) -> int:
    """A --ctx whose KV cache alone exceeds `memory_total`, by rbee-hive's own estimate."""
    info = run("rbee-hive", "models", "info", model_id, "--format", "json").json()
    per_token = int(info["gguf"]["kv_per_token"]) * KV_BYTES_PER_ELEMENT
    return memory_total // per_token + 1


def cpu_memory_total() -> int:
    """This machine's RAM as rbee-hive counts it (MemTotal)."""
    doc = run("rbee-hive", "detect", "--format", "json").json()
    return int(next(d["memory_total"] for d in doc["devices"] if d["backend"] == "cpu"))
