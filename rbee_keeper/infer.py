"""`rbee infer`: find or make a worker for the model, then stream its tokens.

Warm path: a known worker (the cache) that answers /health with the model — no SSH at all.
Cold path: status from every host in parallel → placement → download if the host lacks the
file → spawn a worker if none serves the model → stream.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rbee_common.errors import (
    AllSlotsBusy,
    InsufficientMemory,
    Interrupted,
    ModelNotFound,
    RbeeError,
    WorkerCrashed,
)
from rbee_common.http import get_health
from rbee_common.models import ID_RE, ModelSpec
from rbee_common.progress import Reporter, null_reporter
from rbee_keeper import cache
from rbee_keeper.errors import NoPlacement, UnknownHost
from rbee_keeper.hostsfile import host_names
from rbee_keeper.worker_client import Busy, Stream, cancel, execute

if TYPE_CHECKING:  # the cold path's modules load only when it runs
    from rbee_keeper.hive import Session
    from rbee_keeper.hosts import HostConfig
    from rbee_keeper.placement import ModelNeed, Placement

SCHEMA = "rbee.infer/v1"


@dataclass(frozen=True)
class InferRequest:
    model: str
    prompt: str
    hosts: tuple[str, ...] = ()
    backend: str | None = None
    device: int | None = None
    ctx: int | None = None
    max_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    seed: int | None = None
    stop: tuple[str, ...] = ()
    busy_wait: float = 30.0
    status_timeout: float = 20.0

    def body(self, job_id: str) -> dict[str, Any]:
        return {"job_id": job_id, "prompt": self.prompt, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "seed": self.seed, "stop": list(self.stop)}


def url_for(host: HostConfig, port: int) -> str:
    address = host.worker_address()
    return f"http://[{address}]:{port}" if ":" in address else f"http://{address}:{port}"


def run(req: InferRequest, on_text: Callable[[str], None], report: Reporter = null_reporter,
        accept_new_host_key: bool = False) -> dict[str, Any]:
    """Place, provision and stream one job; return the `rbee.infer/v1` document."""
    t0 = time.perf_counter()
    names = host_names()
    unknown = set(req.hosts) - names
    if unknown:
        raise UnknownHost(f"no host {sorted(unknown)[0]!r} in hosts.toml "
                          f"(known: {', '.join(sorted(names))})")
    timings: dict[str, float] = {}
    job_id = f"job-{secrets.token_hex(6)}"
    busy: list[cache.KnownWorker] = []
    for known in cache.matching(req.model, set(req.hosts) or names, req.backend, req.device,
                                req.ctx):
        health = get_health(known.url, timeout=1.0)
        if not health or health.get("worker_id") != known.id or health.get("model") != known.model:
            cache.forget(known.id, known.host)
            continue
        try:
            stream = _stream(known.url, known.token, req, job_id, on_text, wait=0.0)
        except Busy:
            busy.append(known)
            continue
        except WorkerCrashed as e:
            if e.details.get("tokens"):
                raise
            cache.forget(known.id, known.host)  # died before saying anything: go cold
            continue
        return _document(known.model, stream, known, "warm", None, timings, t0)
    from rbee_keeper.hive import Session
    from rbee_keeper.hosts import select

    spec = _spec(req.model)
    hosts = select(list(req.hosts) or None)
    placement: Placement | None = None
    with Session(accept_new_host_key) as session:
        try:
            known, placement = _cold(req, spec, hosts, session, report, timings)
        except (NoPlacement, InsufficientMemory):
            if not busy:
                raise
            known = busy[0]  # nowhere to start another worker: wait for the busy one
            report({"event": "log", "message": f"rbee: waiting for busy worker {known.id}"})
    try:
        stream = _stream(known.url, known.token, req, job_id, on_text, wait=req.busy_wait)
    except WorkerCrashed:
        cache.forget(known.id, known.host)
        raise
    return _document(spec.id, stream, known, "cold" if placement else "warm", placement,
                     timings, t0)


def _spec(ref: str) -> ModelSpec:
    """The controller's view of a reference; an unknown plain id may be a host's import."""
    from rbee_common.catalog import resolve_ref

    try:
        return resolve_ref(ref)
    except ModelNotFound:
        if not ID_RE.match(ref):
            raise
        return ModelSpec(ref, ref, None)  # type: ignore[arg-type]


def _cold(req: InferRequest, spec: ModelSpec, hosts: dict[str, HostConfig], session: Session,
          report: Reporter, timings: dict[str, float]) -> tuple[cache.KnownWorker, Placement]:
    from rbee_keeper.fanout import fan_out
    from rbee_keeper.placement import Constraints, place

    t = time.perf_counter()
    outcomes = fan_out(hosts, lambda n: session.hive(hosts[n]).status(
        timeout=req.status_timeout), req.status_timeout)
    timings["status_ms"] = (time.perf_counter() - t) * 1000
    statuses: dict[str, dict[str, Any] | RbeeError] = {
        o.name: o.value if o.ok and o.value is not None else o.error or RbeeError("no status")
        for o in outcomes}
    need = _need(spec, statuses, timings)
    placement = place(statuses, need, Constraints(req.backend, req.device, req.ctx))
    chosen = placement.chosen
    host = hosts[chosen.host]
    hive = session.hive(host)
    report({"event": "log", "message": f"rbee: {spec.id} → {chosen.label} ({chosen.why()})"})
    if chosen.worker is not None:
        token = str(hive.call("worker", "token", chosen.worker["id"])["token"])
        record = chosen.worker
    else:
        if not chosen.has_model:
            t = time.perf_counter()
            args = ["models", "download", str(spec.source), "--id", spec.id]
            if spec.sha256:
                args += ["--sha256", spec.sha256]
            hive.call(*args, on_event=report)
            timings["download_ms"] = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        token = secrets.token_urlsafe(32)
        record = hive.call("worker", "spawn", chosen.backend, "--model", spec.id,
                           "--device", str(chosen.device), "--ctx", str(placement.ctx),
                           "--bind", host.worker_bind(), "--token-stdin",
                           on_event=report, token=token)
        timings["spawn_ms"] = (time.perf_counter() - t) * 1000
    known = cache.KnownWorker(host=host.name, id=record["id"], url=url_for(host, record["port"]),
                              token=token, model=spec.id, backend=record["backend"],
                              device=record["device"], ctx=record["ctx"], ref=req.model)
    cache.remember(known)
    return known, placement


def _need(spec: ModelSpec, statuses: dict[str, dict[str, Any] | RbeeError],
          timings: dict[str, float]) -> ModelNeed:
    from rbee_keeper.placement import ModelNeed

    need = ModelNeed(spec.id, str(spec.source or ""), spec.sha256, spec.size,
                     downloadable=spec.source is not None)
    for status in statuses.values():
        if isinstance(status, RbeeError):
            continue
        for m in status.get("models", []):
            if need.matches(m):
                return dataclasses.replace(need, size=m["size"], data_offset=m["data_offset"],
                                           kv_per_token=m["kv_per_token"],
                                           context_length=m["context_length"])
    if spec.source is None:
        raise ModelNotFound(f"no model {spec.id!r} in the catalog or on any host",
                            hint="See `rbee-hive models catalog`, import the file on a host "
                                 "(`rbee pool models import PATH --id ID --host NAME`), or name "
                                 "a source: hf:ORG/REPO/FILE.gguf, https://…, file:/….")
    from rbee_keeper.probe import probe

    t = time.perf_counter()
    header = probe(spec.source)
    timings["probe_ms"] = (time.perf_counter() - t) * 1000
    return dataclasses.replace(need, **header) if header else need


def _stream(url: str, token: str, req: InferRequest, job_id: str,
            on_text: Callable[[str], None], wait: float) -> Stream:
    """Stream the job; on 503, retry after Retry-After until `wait` seconds have passed."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return execute(url, token, req.body(job_id), on_text)
        except Busy as e:
            if time.monotonic() + e.retry_after > deadline:
                if wait <= 0:
                    raise
                raise AllSlotsBusy(f"the worker at {url} stayed busy for {wait:g}s",
                                   worker=url) from e
            time.sleep(e.retry_after)
        except KeyboardInterrupt:
            cancel(url, token, job_id)
            raise Interrupted(f"cancelled job {job_id}", hint="", job_id=job_id) from None


def _document(model: str, stream: Stream, known: cache.KnownWorker,
              path: str, placement: Placement | None, timings: dict[str, float],
              t0: float) -> dict[str, Any]:
    end = stream.end or {}
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "model": model,
        "text": "".join(stream.text),
        "tokens": int(end.get("tokens_out", stream.tokens)),
        "prompt_tokens": end.get("prompt_tokens"),
        "stop_reason": end.get("stop_reason"),
        "timings": {
            "ttft_ms": round(stream.ttft_ms or 0.0, 2),
            "tokens_per_sec": end.get("tokens_per_sec"),
            "total_ms": round((time.perf_counter() - t0) * 1000, 2),
            "stream_ms": round(stream.total_ms, 2),
            "worker_ttft_ms": end.get("ttft_ms"),
            **{k: round(v, 2) for k, v in timings.items()},
        },
        "host": known.host,
        "worker": {"id": known.id, "url": known.url, "backend": known.backend,
                   "device": known.device},
        "placement": {"path": path, **(placement.to_dict() if placement else {
            "chosen": {"host": known.host, "backend": known.backend, "device": known.device,
                       "reason": "known worker answered /health", "worker": known.id},
            "rejected": []})},
    }
    return doc
