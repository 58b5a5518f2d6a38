"""One model across several hosts (llama.cpp RPC): which hosts, which devices, what share.

When no host can hold a model with all its devices, placement looks for a split: one host
runs the worker (the primary: it reads the model file) and the others lend devices to it
over RPC. The fit rule (rbee_common.fit) applies to every device, each holding a share in
proportion to its available memory. Ranked, best first:

    fewest hosts; then fewest devices reached over the network (each RPC device is a hop on
    every token); then the most available memory in all; a primary that has the model file.

`rbee infer --split A,B` asks for exactly those hosts, the first running the worker.
Pure: plain status documents in, a decision with reasons out.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rbee_common.errors import RbeeError
from rbee_common.estimate import Estimate, human_bytes
from rbee_common.fit import Room, fit, holders, room_of
from rbee_common.names import GPU_BACKENDS

if TYPE_CHECKING:
    from rbee_keeper.placement import Constraints, ModelNeed, Rejection

MAX_SPLIT_HOSTS = 4  # beyond this the network, not memory, is the limit


def split_hosts(text: str | None, hosts: Sequence[str] | None = None,
                device: str | None = None) -> tuple[str, ...]:
    """`--split A,B`: two or more distinct host names (USAGE otherwise)."""
    from rbee_common.errors import UsageError

    if text is None:
        return ()
    names = tuple(n.strip() for n in text.split(","))
    if len(names) < 2 or not all(names) or len(set(names)) != len(names):
        raise UsageError(f"--split {text!r}: name two or more different hosts, e.g. "
                         "--split workstation,gaming")
    if hosts:
        raise UsageError("--split names the hosts itself: leave out --host")
    if device is not None:
        raise UsageError("--split chooses each host's devices itself: leave out --device")
    return names


@dataclass(frozen=True)
class Share:
    """One device's part of a split."""

    host: str
    backend: str
    index: int
    role: str  # "worker" (the primary's own device) or "lender" (reached over RPC)
    available: int | None
    share_bytes: int
    fraction: float

    @property
    def label(self) -> str:
        return f"{self.host} {self.backend}:{self.index}"

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "backend": self.backend, "device": self.index,
                "role": self.role, "available": self.available,
                "share_bytes": self.share_bytes, "fraction": self.fraction}


@dataclass(frozen=True)
class Split:
    """A model split over a primary host's devices and other hosts' lent devices.

    `shares` is in the worker's device order: the lenders' RPC devices first, then the
    primary's own (llama.cpp's tensor_split follows that order).
    """

    primary: str
    shares: tuple[Share, ...]
    has_model: bool

    @property
    def hosts(self) -> list[str]:
        return list(dict.fromkeys([self.primary, *(s.host for s in self.shares)]))

    @property
    def lenders(self) -> list[Share]:
        return [s for s in self.shares if s.role == "lender"]

    @property
    def local(self) -> list[Share]:
        return [s for s in self.shares if s.role == "worker"]

    @property
    def tensor_split(self) -> tuple[float, ...]:
        return tuple(s.fraction for s in self.shares)

    @property
    def available(self) -> int:
        return sum(max(s.available or 0, 0) for s in self.shares)

    def why(self) -> str:
        parts = " + ".join(f"{s.label} {s.fraction:.0%}" for s in self.shares)
        return (f"no single host fits: split across {len(self.hosts)} hosts ({parts}), "
                f"worker on {self.primary}, "
                f"{'model already there' if self.has_model else 'model to download'}")

    def to_dict(self) -> dict[str, Any]:
        return {"primary": self.primary, "hosts": self.hosts,
                "devices": [s.to_dict() for s in self.shares]}


@dataclass(frozen=True)
class HostRooms:
    """What a host can give a split: its devices' rooms, and whether it has the model."""

    name: str
    rooms: tuple[Room, ...]
    has_model: bool
    can_run: bool  # it has the model or can download it


def host_rooms(name: str, status: Mapping[str, Any], need: ModelNeed, backend: str | None,
               est: Estimate) -> tuple[HostRooms | None, str, str | None]:
    """A host's usable devices for a split (its GPUs of one backend, else its CPU); or why
    it has none, and the backend whose memory is short when that is why."""
    rpc = status.get("rpc") or {}
    if rpc and not rpc.get("available", True):
        return None, f"no RPC: {rpc.get('reason') or 'its llama-cpp-python lacks it'}", None
    backends = {b["name"]: b for b in status.get("backends", [])}
    workers = holders(status.get("workers", []), status.get("lenders", []))
    reserve = status.get("reserve_bytes")
    by_backend: dict[str, list[Room]] = {}
    short: set[str] = set()
    for dev in status.get("devices", []):
        b = dev["backend"]
        if not backends.get(b, {}).get("available") or (backend and b != backend):
            continue
        room = room_of(dev, workers, reserve)
        if room.available is not None and room.available <= est.overhead_bytes:
            short.add(b)  # too little to hold even its own compute buffers
            continue
        by_backend.setdefault(b, []).append(room)
    gpus = [b for b in by_backend if b in GPU_BACKENDS]
    chosen = max(gpus, key=lambda b: sum(r.available or 0 for r in by_backend[b]),
                 default=None) or ("cpu" if "cpu" in by_backend else None)
    if chosen is None:
        if short:
            return None, "no device with room to lend", sorted(short)[0]
        return None, "no device for the request", None
    has_model = any(need.matches(m) for m in status.get("models", []))
    return HostRooms(name, tuple(by_backend[chosen]), has_model,
                     has_model or need.downloadable), "", None


def _plan(primary: HostRooms, lenders: Sequence[HostRooms], est: Estimate) -> Split | None:
    rooms = [r for h in lenders for r in h.rooms] + list(primary.rooms)
    owners = [(h.name, "lender") for h in lenders for _ in h.rooms] + \
        [(primary.name, "worker") for _ in primary.rooms]
    verdict = fit(est, rooms)
    fractions = verdict.tensor_split
    shares = tuple(Share(host, r.backend, r.index, role, r.available, s, f)
                   for (host, role), r, s, f in zip(owners, rooms, verdict.shares, fractions,
                                                     strict=True))
    split = Split(primary.name, shares, primary.has_model)
    return split if verdict.ok else None


def _rank(split: Split) -> tuple[int, int, int, bool]:
    return (len(split.hosts), len(split.lenders), -split.available, not split.has_model)


def plan_split(statuses: Mapping[str, dict[str, Any] | RbeeError], need: ModelNeed,
               c: Constraints, est: Estimate, named: Sequence[str] | None,
               rejected: list[Rejection]) -> Split | None:
    """The best split (or the one across `named` hosts, the first running the worker);
    None when none fits, with the reasons added to `rejected`."""
    from rbee_keeper.placement import Rejection

    usable: dict[str, HostRooms] = {}
    for name in (named or sorted(statuses)):
        status = statuses.get(name)
        if status is None or isinstance(status, RbeeError):
            continue  # already rejected as unreachable
        rooms, why, short = host_rooms(name, status, need, c.backend, est)
        if rooms is not None:
            usable[name] = rooms
        elif short is None or named:  # (short of memory alone: its own rejection says so)
            rejected.append(Rejection(name, short, None, f"split: {why}",
                                      memory=short is not None))
    if named:
        if len(usable) < len(named):
            return None
        primary, *others = (usable[n] for n in named)
        split = _plan(primary, others, est)
        if split is None:
            backends = {r.backend for h in (*others, primary) for r in h.rooms}
            rejected.append(Rejection(named[0], backends.pop() if len(backends) == 1 else None,
                                      None, "split: " + fit(
                est, [r for h in (*others, primary) for r in h.rooms]).reason(), memory=True))
        return split
    best: Split | None = None
    for k in range(2, min(len(usable), MAX_SPLIT_HOSTS) + 1):
        for group in itertools.combinations(usable.values(), k):
            for primary in group:
                if not primary.can_run:
                    continue
                split = _plan(primary, [h for h in group if h is not primary], est)
                if split is not None and (best is None or _rank(split) < _rank(best)):
                    best = split
        if best is not None:
            return best  # fewest hosts first: a larger group is never better
    if len(usable) >= 2:
        rooms = [r for h in usable.values() for r in h.rooms]
        total = sum(max(r.available or 0, 0) for r in rooms)
        backends = {r.backend for r in rooms}
        rejected.append(Rejection(
            "+".join(usable), backends.pop() if len(backends) == 1 else None, None,
            f"split: needs {human_bytes(est.total_bytes)} plus each device's overhead, "
            f"{human_bytes(total)} available on {len(usable)} hosts together", memory=True))
    return None
