"""Worker lifecycle decisions, as plain functions of plain data (ollama's sched.go keeps
these swappable too): which idle workers to evict for a job, which have outlived their
idle TTL, how long to wait before starting a model that keeps crashing, and whether a
model with waiting jobs deserves another worker.

They decide; the queen (or any other caller) acts. Tests call them with fake inventories.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from rbee_common.errors import InsufficientMemory, RbeeError
from rbee_common.fit import worker_devices
from rbee_keeper.errors import NoPlacement
from rbee_keeper.placement import Constraints, ModelNeed, Placement, place

DEFAULT_TTL = 300.0  # seconds an idle worker is kept (0 = for ever)
MAX_WORKERS_PER_MODEL = 4
BACKOFF_CAP = 300.0


@dataclass(frozen=True)
class Idle:
    """A worker the caller manages and that runs no job now."""

    id: str
    host: str
    model: str
    backend: str
    devices: tuple[int, ...]
    last_used: float  # when its last job ended (or it became ready)


@dataclass(frozen=True)
class EvictionPlan:
    """Stop these workers (least recently used first), then place as `placement` says."""

    victims: tuple[Idle, ...]
    placement: Placement

    def reason(self) -> str:
        c = self.placement.chosen
        return (f"{c.host} {c.device_label} needs the memory of {len(self.victims)} idle "
                f"worker(s) to fit the model")


def _credit(status: dict[str, Any], victims: Iterable[Idle]) -> dict[str, Any]:
    """The status a host would report once `victims` are stopped: their records gone, the
    memory they hold (their estimate, per device) free again."""
    out = copy.deepcopy(status)
    ids = {v.id for v in victims}
    freed: dict[tuple[str, int], int] = {}
    keep = []
    for w in out.get("workers", []):
        if w.get("id") not in ids:
            keep.append(w)
            continue
        devices = worker_devices(w)
        shares = w.get("device_bytes")
        for i, d in enumerate(devices):
            share = (int(shares[i]) if isinstance(shares, list) and len(shares) == len(devices)
                     else int(w.get("estimate_bytes") or 0) // len(devices))
            freed[(str(w.get("backend")), d)] = freed.get((str(w.get("backend")), d), 0) + share
    out["workers"] = keep
    for dev in out.get("devices", []):
        extra = freed.get((dev["backend"], dev["index"]), 0)
        if extra and dev.get("memory_free") is not None:
            dev["memory_free"] = int(dev["memory_free"]) + extra
    return out


def plan_eviction(statuses: Mapping[str, dict[str, Any] | RbeeError], need: ModelNeed,
                  c: Constraints, idle: Iterable[Idle]) -> EvictionPlan | None:
    """The fewest least-recently-used idle workers whose memory lets the job fit, or None.

    Workers are grouped by the device they hold; for each device, evict its LRU idle
    workers one by one until placement on that host finds the device with room. Among the
    devices where that works, the plan with the fewest victims wins (then the one whose
    victims were idle the longest).
    """
    groups: dict[tuple[str, str, tuple[int, ...]], list[Idle]] = {}
    for w in idle:
        if w.model != need.id:
            groups.setdefault((w.host, w.backend, w.devices), []).append(w)
    best: EvictionPlan | None = None
    for (host, backend, devices), workers in groups.items():
        status = statuses.get(host)
        if not isinstance(status, dict):
            continue
        workers.sort(key=lambda w: w.last_used)
        for k in range(1, len(workers) + 1):
            victims = tuple(workers[:k])
            try:
                p = place({host: _credit(status, victims)}, need,
                          Constraints(backend=c.backend or backend, device=c.device, ctx=c.ctx,
                                      auto_split=False))
            except (InsufficientMemory, NoPlacement):
                continue
            if p.chosen.backend != backend or not set(p.chosen.devices) & set(devices):
                continue  # it fits elsewhere on the host: not these victims' doing
            plan = EvictionPlan(victims, p)
            if best is None or (len(plan.victims), plan.victims[-1].last_used) < (
                    len(best.victims), best.victims[-1].last_used):
                best = plan
            break
    return best


def expired(idle: Iterable[Idle], ttl_of: Callable[[str], float], now: float) -> list[Idle]:
    """Idle workers whose model's TTL has passed since their last job (TTL 0: never)."""
    return [w for w in idle if (ttl := ttl_of(w.model)) > 0 and now - w.last_used >= ttl]


def crash_backoff(failures: int) -> float:
    """Seconds to wait before starting a model again after `failures` failures in a row:
    none after one, then 2, 4, 8 … up to five minutes, so a model that crashes on load is
    never retried in a hot loop."""
    if failures <= 1:
        return 0.0
    return float(min(2 ** (failures - 1), BACKOFF_CAP))


def wants_another_worker(waiting: int, workers: int, busy: int,
                         limit: int = MAX_WORKERS_PER_MODEL) -> bool:
    """Start one more worker for a model when jobs wait for it, every worker it has is busy,
    and it has fewer than `limit`; the caller starts it only where placement finds room
    without evicting anything."""
    return waiting > 0 and busy >= workers and workers < limit
