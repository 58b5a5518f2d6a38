"""Where a job runs: filter the candidates, then score them; every rejection has a reason.

Candidates come from each host's `rbee-hive status`: every device of an available backend,
and — when no single GPU of a host can hold the model — all the GPUs of that host together
(llama.cpp's layer split, weights in proportion to each card's available memory).
Filters: the host answered; the backend is available; the device matches the constraints;
the model fits by the one fit rule (rbee_common.fit) — unless an idle worker already serves
it there. When no host fits on its own, a split across hosts (rbee_keeper.split: llama.cpp
RPC) is the candidate; `--split A,B` asks for one.
Score, best first: an idle worker already serving the model; a GPU over the CPU; the model
file already on the host; the most available memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from rbee_common.errors import InsufficientRam, InsufficientVram, ModelNotFound, RbeeError
from rbee_common.estimate import Estimate, estimate, human_bytes
from rbee_common.fit import Fit, Room, default_ctx, fit, holders, room_of, worker_devices
from rbee_common.models import ModelSpec
from rbee_common.names import GPU_BACKENDS, WorkerState
from rbee_keeper.errors import NoPlacement

if TYPE_CHECKING:
    from rbee_keeper.split import Split


@dataclass(frozen=True)
class ModelNeed:
    """What placement knows about the model: enough to estimate its memory."""

    id: str
    source: str
    sha256: str | None = None
    size: int | None = None
    data_offset: int | None = None
    kv_per_token: int | None = None
    context_length: int | None = None
    downloadable: bool = True  # False for an id only some host has registered (an import)

    def ctx(self, wanted: int | None) -> int:
        return wanted or default_ctx(self.context_length)

    def estimate(self, ctx: int) -> Estimate | None:
        if self.size is None:
            return None
        return estimate(self.size, self.data_offset or 0, self.kv_per_token, ctx)

    def matches(self, model: dict[str, Any]) -> bool:
        """Is a model record of a host this very model?"""
        if model.get("id") != self.id:
            return False
        if self.sha256 and model.get("sha256"):
            return bool(model["sha256"] == self.sha256)
        return not self.source or bool(model.get("source") == self.source)


def need_for(spec: ModelSpec, statuses: Mapping[str, dict[str, Any] | RbeeError]
             ) -> tuple[ModelNeed, bool]:
    """What placement knows of a model: from a host that has it (its GGUF figures), else
    from the reference alone; and whether a host had it. MODEL_NOT_FOUND when there is
    nowhere to get it from."""
    need = ModelNeed(spec.id, str(spec.source or ""), spec.sha256, spec.size,
                     downloadable=spec.source is not None)
    for status in statuses.values():
        if isinstance(status, RbeeError):
            continue
        for m in status.get("models", []):
            if need.matches(m):
                return replace(need, size=m["size"], data_offset=m["data_offset"],
                               kv_per_token=m["kv_per_token"],
                               context_length=m["context_length"]), True
    if spec.source is None:
        down = {name: s for name, s in statuses.items() if isinstance(s, RbeeError)}
        if down:
            names = ", ".join(f"{n} ({e.code})" for n, e in sorted(down.items()))
            raise ModelNotFound(
                f"no reachable host has a model {spec.id!r}, and it is not in the catalog; "
                f"unreachable: {names}",
                hint="The model may be on a host that did not answer: check it with "
                     "`rbee hosts check NAME`, or name a source (hf:…, https://…, file:…).",
                unreachable=sorted(down))
        raise ModelNotFound(f"no model {spec.id!r} in the catalog or on any host",
                            hint="See `rbee-hive models catalog`, import the file on a host "
                                 "(`rbee pool models import PATH --id ID --host NAME`), or name "
                                 "a source: hf:ORG/REPO/FILE.gguf, https://…, file:/….")
    return need, False


@dataclass(frozen=True)
class Constraints:
    backend: str | None = None
    device: int | tuple[int, ...] | None = None  # one device, or several to split across
    ctx: int | None = None
    split: tuple[str, ...] | None = None  # exactly these hosts, the first runs the worker
    auto_split: bool = True  # when no host fits alone, consider a split across hosts

    def devices(self) -> tuple[int, ...] | None:
        if self.device is None:
            return None
        return (self.device,) if isinstance(self.device, int) else tuple(self.device)


@dataclass(frozen=True)
class Candidate:
    host: str
    backend: str
    devices: tuple[int, ...]
    memory_free: int | None
    available: int | None
    has_model: bool
    worker: dict[str, Any] | None  # an idle worker that already serves the model
    tensor_split: tuple[float, ...] = ()  # proportions when split across several devices
    split: Split | None = None  # across hosts: lenders' devices reached over RPC

    @property
    def device(self) -> int:
        return self.devices[0]

    @property
    def device_label(self) -> str:
        return f"{self.backend}:{'+'.join(str(d) for d in self.devices)}"

    @property
    def label(self) -> str:
        return f"{self.host} {self.device_label}"

    def score(self) -> tuple[bool, bool, bool, int]:
        return (self.worker is not None, self.backend in GPU_BACKENDS, self.has_model,
                self.available or 0)

    def why(self) -> str:
        if self.split is not None:
            return self.split.why()
        if self.worker is not None:
            return f"idle worker {self.worker['id']} already serves the model"
        parts = ["GPU" if self.backend in GPU_BACKENDS else "CPU"]
        if len(self.devices) > 1:
            shares = ", ".join(f"{p:.0%}" for p in self.tensor_split)
            parts[0] = f"{len(self.devices)} GPUs, no single one fits (split {shares})"
        parts.append("model already here" if self.has_model else "model to download")
        parts.append(f"{human_bytes(self.available)} available")
        return ", ".join(parts)


@dataclass(frozen=True)
class Rejection:
    host: str
    backend: str | None
    device: int | None
    reason: str
    memory: bool = False  # rejected for lack of memory
    devices: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("memory")
        d["devices"] = list(self.devices) if self.devices else (
            None if self.device is None else [self.device])
        return d

    def label(self) -> str:
        if not self.backend or self.device is None:
            return self.host
        devices = self.devices or (self.device,)
        return f"{self.host} {self.backend}:{'+'.join(str(d) for d in devices)}"


@dataclass(frozen=True)
class Placement:
    chosen: Candidate
    ctx: int
    estimate: Estimate | None
    rejected: list[Rejection]

    def to_dict(self) -> dict[str, Any]:
        c = self.chosen
        return {
            "chosen": {"host": c.host, "backend": c.backend, "device": c.device,
                       "devices": list(c.devices), "tensor_split": list(c.tensor_split),
                       "reason": c.why(), "worker": c.worker["id"] if c.worker else None,
                       "split": c.split.to_dict() if c.split else None},
            "ctx": self.ctx,
            "estimate": self.estimate.to_dict() if self.estimate else None,
            "rejected": [r.to_dict() for r in self.rejected],
        }


def _idle_worker(status: dict[str, Any], need: ModelNeed, backend: str,
                 devices: tuple[int, ...], ctx: int | None) -> dict[str, Any] | None:
    for w in status.get("workers", []):
        if (w.get("model") == need.id and w.get("backend") == backend
                and tuple(worker_devices(w)) == devices and w.get("state") == WorkerState.ready
                and (ctx is None or w.get("ctx", 0) >= ctx)):
            return dict(w)
    return None


def _split_candidate(name: str, status: dict[str, Any], need: ModelNeed, c: Constraints,
                     est: Estimate | None, rooms: list[Room], has_model: bool,
                     rejected: list[Rejection]) -> Candidate | None:
    """All the GPUs of one backend on a host together (llama.cpp's layer split)."""
    backend, devices = rooms[0].backend, tuple(r.index for r in rooms)
    worker = _idle_worker(status, need, backend, devices, c.ctx)
    verdict: Fit | None = fit(est, rooms) if est is not None else None
    if worker is None and verdict is not None and not verdict.ok:
        rejected.append(Rejection(name, backend, devices[0], f"split: {verdict.reason()}",
                                  memory=True, devices=devices))
        return None
    split = verdict.tensor_split if verdict is not None else tuple(1 / len(rooms) for _ in rooms)
    return Candidate(name, backend, devices, sum(r.free or 0 for r in rooms),
                     sum(max(r.available or 0, 0) for r in rooms), has_model, worker, split)


def _host_candidates(name: str, status: dict[str, Any], need: ModelNeed, c: Constraints,
                     est: Estimate | None, rejected: list[Rejection]) -> list[Candidate]:
    backends = {b["name"]: b for b in status.get("backends", [])}
    if c.backend and not backends.get(c.backend, {}).get("available"):
        reason = backends.get(c.backend, {}).get("reason") or "unknown backend"
        rejected.append(Rejection(name, c.backend, None, f"{c.backend} unavailable: {reason}"))
        return []
    has_model = any(need.matches(m) for m in status.get("models", []))
    if not has_model and not need.downloadable:
        rejected.append(Rejection(name, None, None, f"has no model {need.id!r}"))
        return []
    workers = holders(status.get("workers", []), status.get("lenders", []))
    reserve = status.get("reserve_bytes")  # the host's own setting, as it reported it
    wanted = c.devices()
    out: list[Candidate] = []
    gpu_rooms: dict[str, list[Room]] = {}
    for dev in status.get("devices", []):
        b, idx = dev["backend"], dev["index"]
        if not backends.get(b, {}).get("available") or (c.backend and b != c.backend):
            continue
        room = room_of(dev, workers, reserve)
        if wanted is not None and idx not in wanted:
            rejected.append(Rejection(name, b, idx, "not the requested device "
                                      + ",".join(str(d) for d in wanted)))
            continue
        if b in GPU_BACKENDS:
            gpu_rooms.setdefault(b, []).append(room)
        if wanted is not None and len(wanted) > 1:
            continue  # pinned to several devices: only the split below is a candidate
        worker = _idle_worker(status, need, b, (idx,), c.ctx)
        if worker is None and est is not None and not (verdict := fit(est, [room])).ok:
            rejected.append(Rejection(name, b, idx, verdict.reason(), memory=True))
            continue
        out.append(Candidate(name, b, (idx,), room.free, room.available, has_model, worker))
    for b, rooms in gpu_rooms.items():
        if len(rooms) < 2 or any(cand.backend == b for cand in out):
            continue  # one card holds it (or there is only one): no split
        if wanted is not None and set(wanted) != {r.index for r in rooms}:
            continue
        usable = [r for r in rooms if wanted is not None
                  or (r.available or 0) > (est.overhead_bytes if est else 0)]
        if len(usable) < 2:
            continue
        cand = _split_candidate(name, status, need, c, est, usable, has_model, rejected)
        if cand is not None:
            out.append(cand)
    if not out and not any(r.host == name for r in rejected):
        rejected.append(Rejection(name, c.backend, wanted[0] if wanted else None,
                                  "no device for the request"))
    return out


def place(statuses: dict[str, dict[str, Any] | RbeeError], need: ModelNeed,
          c: Constraints) -> Placement:
    """Choose a candidate, or raise with every candidate's reason."""
    ctx = need.ctx(c.ctx)
    est = need.estimate(ctx)
    rejected: list[Rejection] = []
    survivors: list[Candidate] = []
    for name, status in statuses.items():
        if isinstance(status, RbeeError):
            rejected.append(Rejection(name, None, None,
                                      f"unreachable ({status.code}): {status.message}"))
            continue
        if not c.split:
            survivors += _host_candidates(name, status, need, c, est, rejected)
    if c.split or (not survivors and c.auto_split and c.device is None):
        split = _split_candidate_across_hosts(statuses, need, c, est, rejected)
        if split is not None:
            return Placement(split, ctx, est, rejected)
    if not survivors:
        raise _nothing_fits(need, rejected)
    ranked = sorted(survivors, key=Candidate.score, reverse=True)
    chosen = ranked[0]
    for other in ranked[1:]:
        rejected.append(Rejection(other.host, other.backend, other.device,
                                  f"ranked lower ({other.why()})",
                                  devices=other.devices if len(other.devices) > 1 else None))
    return Placement(chosen, ctx, est, rejected)


def _split_candidate_across_hosts(statuses: dict[str, dict[str, Any] | RbeeError],
                                  need: ModelNeed, c: Constraints, est: Estimate | None,
                                  rejected: list[Rejection]) -> Candidate | None:
    from rbee_keeper.split import plan_split

    if est is None:
        if c.split:
            rejected.append(Rejection(c.split[0], None, None, "split: the model's size is "
                                      "unknown (no host has it and its header was not read)"))
        return None
    split = plan_split(statuses, need, c, est, c.split, rejected)
    if split is None:
        return None
    local = split.local
    return Candidate(split.primary, local[0].backend, tuple(s.index for s in local),
                     sum(s.available or 0 for s in local), split.available, split.has_model,
                     None, split.tensor_split, split)


def _nothing_fits(need: ModelNeed, rejected: list[Rejection]) -> RbeeError:
    lines = "; ".join(f"{r.label()}: {r.reason}" for r in rejected)
    details = {"rejected": [r.to_dict() for r in rejected]}
    message = f"no host can run {need.id}: {lines or 'no hosts'}"
    if rejected and all(r.memory for r in rejected):
        gpu = all(r.backend in GPU_BACKENDS for r in rejected)
        cls = InsufficientVram if gpu else InsufficientRam
        return cls(message, hint="Use a smaller --ctx, a smaller model or quantisation, or "
                                 "stop idle workers (`rbee workers list`).", **details)
    return NoPlacement(message, hint="See each host's reason above; `rbee pool status` shows "
                                     "the whole pool.", **details)
