"""The fit rule: does a model at a context size fit on one device, or across several?

One definition, used by a hive's admission check (`worker spawn`) and by the keeper's
placement, so both always agree:

    available = free − reserve − promised
      free      what the device reports free now (NVML, /proc/meminfo)
      reserve   left for the OS and other programs (RBEE_RESERVE_MIB on that host)
      promised  estimates of workers still loading there (they have not taken it yet)
    and, where the host caps what rbee may use (`memory_limit`, RBEE_MAX_RAM_MIB for its
    RAM), at most  limit − held − promised,  held being the estimates of its running workers
    (a CPU worker's weights sit in the page cache, which `free` counts as free)
    a model fits when its estimate (rbee_common.estimate) is at most `available`.

Across several GPUs of one host (llama.cpp's layer split), weights and KV cache are split in
proportion to each device's available memory (that is the `tensor_split` the worker gets),
and every device also pays the fixed overhead for its own compute buffers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from rbee_common.estimate import DEFAULT_CTX, Estimate, human_bytes, reserve_bytes
from rbee_common.names import WorkerState, is_gpu

__all__ = ["DEFAULT_CTX", "Fit", "Room", "default_ctx", "fit", "held_bytes", "holders",
           "promised_bytes", "ram_limit", "reserve_bytes", "room_of", "worker_devices"]


def ram_limit() -> int | None:
    """RBEE_MAX_RAM_MIB: the RAM this host's CPU workers may hold in all (None: no cap)."""
    from rbee_common.config import env_number

    limit = env_number("RBEE_MAX_RAM_MIB", -1, minimum=1)
    return None if limit < 0 else int(limit) * 1024 * 1024


def default_ctx(trained: int | None) -> int:
    """The context a new worker gets when none is asked for: min(4096, what it was trained on)."""
    return int(min(DEFAULT_CTX, trained or DEFAULT_CTX))


def worker_devices(record: Mapping[str, Any]) -> list[int]:
    """Every device index a worker record uses (`devices`, or the single `device`)."""
    devices = record.get("devices")
    if isinstance(devices, list) and devices:
        return [int(d) for d in devices]
    return [int(record.get("device") or 0)]


def _share_on(record: Mapping[str, Any], device: int) -> int:
    devices = worker_devices(record)
    if device not in devices:
        return 0
    shares = record.get("device_bytes")
    if isinstance(shares, list) and len(shares) == len(devices):
        return int(shares[devices.index(device)] or 0)
    return int(record.get("estimate_bytes") or 0) // len(devices)


def promised_bytes(workers: Iterable[Mapping[str, Any]], backend: str, device: int) -> int:
    """Memory promised to workers still loading on this device (not yet in `free`)."""
    return sum(_share_on(w, device) for w in workers
               if w.get("state") == WorkerState.loading and w.get("backend") == backend)


def held_bytes(workers: Iterable[Mapping[str, Any]], backend: str, device: int) -> int:
    """Memory the running (ready or busy) workers on this device hold, by their estimates."""
    return sum(_share_on(w, device) for w in workers
               if w.get("state") in (WorkerState.ready, WorkerState.busy)
               and w.get("backend") == backend)


def holders(workers: Iterable[Mapping[str, Any]],
            lenders: Iterable[Mapping[str, Any]] = ()) -> list[Mapping[str, Any]]:
    """A host's workers, and its RPC lenders as what they hold on their device: a lender is
    no worker, but the memory it lends is taken (it counts against a `memory_limit`)."""
    lent = [{"id": lender.get("id"), "backend": lender.get("backend"),
             "device": lender.get("index"), "state": WorkerState.ready,
             "estimate_bytes": int(lender.get("memory_bytes") or 0)}
            for lender in lenders if lender.get("state") in ("ready", "busy")]
    return [*workers, *lent]


@dataclass(frozen=True)
class Room:
    """One device's memory as the fit rule sees it."""

    backend: str
    index: int
    free: int | None
    reserve: int
    promised: int = 0
    limit: int | None = None  # what rbee may use on this device in all (None: no cap)
    held: int = 0  # what its running workers hold (counted against `limit`)

    @property
    def available(self) -> int | None:
        if self.free is None:
            return None
        room = self.free - self.reserve - self.promised
        if self.limit is not None:
            room = min(room, self.limit - self.held - self.promised)
        return room

    @property
    def label(self) -> str:
        return f"{self.backend}:{self.index}"

    def describe(self) -> str:
        loading = (f", {human_bytes(self.promised)} promised to workers still loading"
                   if self.promised else "")
        capped = (f"; rbee may use {human_bytes(self.limit)} here, its workers and lenders hold "
                  f"{human_bytes(self.held)}" if self.limit is not None else "")
        return (f"{self.label} has {human_bytes(self.available)} available "
                f"({human_bytes(self.free)} free less {human_bytes(self.reserve)} reserve"
                f"{loading}{capped})")


def room_of(device: Mapping[str, Any], workers: Iterable[Mapping[str, Any]],
            reserve: int | None = None) -> Room:
    """The Room of a device document (`rbee-hive status`/`detect`) with that host's workers."""
    backend, index = str(device["backend"]), int(device["index"])
    free = device.get("memory_free")
    limit = device.get("memory_limit")
    workers = list(workers)
    return Room(backend, index, None if free is None else int(free),
                reserve_bytes() if reserve is None else int(reserve),
                promised_bytes(workers, backend, index),
                None if limit is None else int(limit), held_bytes(workers, backend, index))


@dataclass(frozen=True)
class Fit:
    """The verdict of the fit rule, with the figures behind it."""

    estimate: Estimate
    rooms: tuple[Room, ...]
    shares: tuple[int, ...]  # bytes each device would hold, in the order of `rooms`

    @property
    def ok(self) -> bool:
        return all(r.available is None or s <= r.available
                   for r, s in zip(self.rooms, self.shares, strict=True))

    @property
    def tensor_split(self) -> tuple[float, ...]:
        """Proportions for llama.cpp's tensor_split (one device: (1.0,))."""
        total = sum(max(r.available or 0, 0) for r in self.rooms)
        if len(self.rooms) == 1 or total <= 0:
            return tuple(1.0 / len(self.rooms) for _ in self.rooms)
        return tuple(round(max(r.available or 0, 0) / total, 4) for r in self.rooms)

    @property
    def gpu(self) -> bool:
        return all(is_gpu(r.backend) for r in self.rooms)

    def needs(self) -> str:
        e = self.estimate
        return (f"{human_bytes(e.total_bytes)} ({human_bytes(e.weights_bytes)} weights + "
                f"{human_bytes(e.kv_bytes)} KV cache at ctx {e.ctx} + "
                f"{human_bytes(e.overhead_bytes)} overhead)")

    def reason(self) -> str:
        """Why it does not fit (or how it fits), in words a user can act on."""
        if len(self.rooms) == 1:
            return f"needs {self.needs()}, {human_bytes(self.rooms[0].available)} available"
        parts = ", ".join(f"{r.label} {human_bytes(s)} of {human_bytes(r.available)}"
                          for r, s in zip(self.rooms, self.shares, strict=True))
        return f"needs {self.needs()} split as {parts}"

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "estimate": self.estimate.to_dict(),
                "devices": [{"backend": r.backend, "index": r.index, "free": r.free,
                             "reserve": r.reserve, "promised": r.promised, "limit": r.limit,
                             "held": r.held, "available": r.available, "share_bytes": s}
                            for r, s in zip(self.rooms, self.shares, strict=True)],
                "tensor_split": list(self.tensor_split)}


def fit(est: Estimate, rooms: Iterable[Room]) -> Fit:
    """Apply the rule on one device, or split across several in proportion to what is free."""
    rooms = tuple(rooms)
    if not rooms:
        raise ValueError("fit() needs at least one device")
    if len(rooms) == 1:
        return Fit(est, rooms, (est.total_bytes,))
    avail = [max(r.available or 0, 0) for r in rooms]
    total = sum(avail)
    body = est.weights_bytes + est.kv_bytes
    if total <= 0:
        shares = tuple(body // len(rooms) + est.overhead_bytes for _ in rooms)
    else:
        shares = tuple(-(-body * a // total) + est.overhead_bytes for a in avail)
    return Fit(est, rooms, shares)
