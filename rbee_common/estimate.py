"""How much memory a model needs at a context size: the one formula placement and spawn share.

    required = weights (tensor bytes of the GGUF)
             + KV cache (f16 keys and values for every layer, for `ctx` tokens)
             + a fixed overhead (compute buffers, runtime)

Devices are compared with `free - reserve`, so the OS and other programs keep some room.

The weights are `file_size - data_offset`: for a model published in several files (gguf-split)
both are totals over its files — the store records the bytes of every file and the sum of
their headers (rbee_common.ggufmeta.read_model_files) — so the weights are every file's
tensor bytes, and every caller of this formula sees a split model whole.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

MiB = 1024 * 1024
KV_BYTES_PER_ELEMENT = 2  # llama.cpp's default f16 KV cache
OVERHEAD_BYTES = 256 * MiB
DEFAULT_CTX = 4096


def reserve_bytes() -> int:
    """Memory left untouched on every device: RBEE_RESERVE_MIB, default 512 MiB."""
    from rbee_common.config import env_number

    return int(env_number("RBEE_RESERVE_MIB", 512)) * MiB


@dataclass(frozen=True)
class Estimate:
    ctx: int
    weights_bytes: int
    kv_bytes: int
    overhead_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.overhead_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_bytes": self.total_bytes}


def estimate(file_size: int, data_offset: int, kv_per_token: int | None, ctx: int) -> Estimate:
    weights = max(file_size - data_offset, 0)
    kv = (kv_per_token or 0) * ctx * KV_BYTES_PER_ELEMENT
    return Estimate(ctx=ctx, weights_bytes=weights, kv_bytes=kv, overhead_bytes=OVERHEAD_BYTES)


def max_ctx_that_fits(file_size: int, data_offset: int, kv_per_token: int | None,
                      available: int) -> int:
    """The largest context that fits in `available` bytes (0 if the weights alone do not)."""
    room = available - max(file_size - data_offset, 0) - OVERHEAD_BYTES
    if room <= 0:
        return 0
    if not kv_per_token:
        return 1 << 30
    return room // (kv_per_token * KV_BYTES_PER_ELEMENT)


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
