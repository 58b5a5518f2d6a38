"""Where a job runs: filter the candidates, then score them; every rejection has a reason.

Candidates are (host, backend, device) triples from each host's `rbee-hive status`.
Filters: the host answered; the backend is available; the device matches the constraints;
the model fits (its estimate ≤ free memory less the reserve and what loading workers will
take) — unless an idle worker already serves it there.
Score, best first: an idle worker already serving the model; a GPU over the CPU; the model
file already on the host; the most free memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from rbee_common.errors import InsufficientRam, InsufficientVram, RbeeError
from rbee_common.estimate import Estimate, estimate, human_bytes
from rbee_common.fit import default_ctx, fit, room_of
from rbee_common.names import GPU_BACKENDS, WorkerState
from rbee_keeper.errors import NoPlacement


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


@dataclass(frozen=True)
class Constraints:
    backend: str | None = None
    device: int | None = None
    ctx: int | None = None


@dataclass(frozen=True)
class Candidate:
    host: str
    backend: str
    device: int
    memory_free: int | None
    available: int | None
    has_model: bool
    worker: dict[str, Any] | None  # an idle worker that already serves the model

    @property
    def label(self) -> str:
        return f"{self.host} {self.backend}:{self.device}"

    def score(self) -> tuple[bool, bool, bool, int]:
        return (self.worker is not None, self.backend in GPU_BACKENDS, self.has_model,
                self.available or 0)

    def why(self) -> str:
        if self.worker is not None:
            return f"idle worker {self.worker['id']} already serves the model"
        parts = ["GPU" if self.backend in GPU_BACKENDS else "CPU"]
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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("memory")
        return d


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
                       "reason": c.why(), "worker": c.worker["id"] if c.worker else None},
            "ctx": self.ctx,
            "estimate": self.estimate.to_dict() if self.estimate else None,
            "rejected": [r.to_dict() for r in self.rejected],
        }


def _idle_worker(status: dict[str, Any], need: ModelNeed, backend: str, device: int,
                 ctx: int | None) -> dict[str, Any] | None:
    for w in status.get("workers", []):
        if (w.get("model") == need.id and w.get("backend") == backend
                and w.get("device") == device and w.get("state") == WorkerState.ready
                and (ctx is None or w.get("ctx", 0) >= ctx)):
            return dict(w)
    return None


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
    out = []
    for dev in status.get("devices", []):
        b, idx = dev["backend"], dev["index"]
        if not backends.get(b, {}).get("available") or (c.backend and b != c.backend):
            continue
        if c.device is not None and idx != c.device:
            rejected.append(Rejection(name, b, idx, f"not the requested device {c.device}"))
            continue
        # the host's own reserve setting, as it reported it
        room = room_of(dev, status.get("workers", []), status.get("reserve_bytes"))
        worker = _idle_worker(status, need, b, idx, c.ctx)
        if worker is None and est is not None and not (verdict := fit(est, [room])).ok:
            rejected.append(Rejection(name, b, idx, verdict.reason(), memory=True))
            continue
        out.append(Candidate(name, b, idx, room.free, room.available, has_model, worker))
    if not out and not any(r.host == name for r in rejected):
        rejected.append(Rejection(name, c.backend, c.device, "no device for the request"))
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
        survivors += _host_candidates(name, status, need, c, est, rejected)
    if not survivors:
        raise _nothing_fits(need, c, rejected)
    ranked = sorted(survivors, key=Candidate.score, reverse=True)
    chosen = ranked[0]
    for other in ranked[1:]:
        rejected.append(Rejection(other.host, other.backend, other.device,
                                  f"ranked lower ({other.why()})"))
    return Placement(chosen, ctx, est, rejected)


def _nothing_fits(need: ModelNeed, c: Constraints, rejected: list[Rejection]) -> RbeeError:
    lines = "; ".join(f"{r.host}" + (f" {r.backend}:{r.device}" if r.backend and r.device
                                     is not None else "") + f": {r.reason}" for r in rejected)
    details = {"rejected": [r.to_dict() for r in rejected]}
    message = f"no host can run {need.id}: {lines or 'no hosts'}"
    if rejected and all(r.memory for r in rejected):
        gpu = all(r.backend in GPU_BACKENDS for r in rejected)
        cls = InsufficientVram if gpu else InsufficientRam
        return cls(message, hint="Use a smaller --ctx, a smaller model or quantisation, or "
                                 "stop idle workers (`rbee workers list`).", **details)
    return NoPlacement(message, hint="See each host's reason above; `rbee pool status` shows "
                                     "the whole pool.", **details)
