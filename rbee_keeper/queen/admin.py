"""What the web UI needs beyond the jobs API: the pool at a glance (and a live stream of
it), chart samples, a model downloaded to a host or a worker started there (with progress),
and a worker's log.

Functions take the `Queen`; decisions stay in core: placement (`rbee_keeper.placement`)
says whether and where on a host a worker fits, provisioning (`rbee_keeper.provision`)
downloads and spawns, the fit rule (`rbee_common.fit`) says what the workers hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rbee_common.asgi import HTTPError, error_response, event_stream, read_model, sse
from rbee_common.errors import InvalidRequest, RbeeError
from rbee_common.fit import held_bytes, promised_bytes, worker_devices
from rbee_common.names import WorkerState
from rbee_keeper.errors import HostUnreachable, UnknownHost
from rbee_keeper.hive import SpawnRequest
from rbee_keeper.hosts import HostConfig
from rbee_keeper.placement import Constraints, Placement, need_for, place
from rbee_keeper.queen.runtime import Queen, model_spec

log = logging.getLogger("rbee.queen")

HINT = "See the web UI's API in rbee_keeper/queen/admin.py."
STREAM_TICK_S = 0.25  # how often the pool stream looks for a change
STREAM_REFRESH_S = 5.0  # … and sends anyway, so heartbeat ages stay true
OP_KEEP_S = 600.0  # finished downloads and starts stay listed this long
SAMPLE_KEEP_S = 3600.0


# downloads and worker starts, with their progress


@dataclass
class Op:
    """A download to a host, or a worker being started there, as the UI follows it."""

    id: str
    kind: str  # download | start
    host: str
    model: str
    state: str = "running"  # running | done | failed
    phase: str = ""  # downloading | loading
    bytes: int | None = None
    total: int | None = None
    worker: str | None = None
    error: dict[str, Any] | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Ops:
    """The downloads and starts asked for from the UI (one at a time per host and model)."""

    def __init__(self) -> None:
        self._ops: dict[str, Op] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def add(self, kind: str, host: str, model: str) -> Op:
        with self._lock:
            now = time.time()
            for op in list(self._ops.values()):
                if op.finished is not None and now - op.finished > OP_KEEP_S:
                    del self._ops[op.id]
                elif op.state == "running" and (op.host, op.model) == (host, model):
                    doing = "downloaded to" if op.kind == "download" else "started on"
                    raise InvalidRequest(f"{model} is already being {doing} {host}",
                                         hint="Wait for it to finish.")
            op = Op(f"op-{next(self._ids)}", kind, host, model)
            self._ops[op.id] = op
            return op

    def finish(self, op: Op, error: RbeeError | None = None) -> None:
        with self._lock:
            op.state = "failed" if error else "done"
            op.error = error.to_dict() if error else None
            op.phase = ""
            op.finished = time.time()

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [op.to_dict() for op in self._ops.values()]


def ops_of(request: Request) -> Ops:
    state = request.app.state
    if not hasattr(state, "ops"):  # made on first use, on the event loop's one thread
        state.ops = Ops()
    return state.ops  # type: ignore[no-any-return]


def _host(q: Queen, name: str) -> HostConfig:
    config = q.load_hosts().get(name)
    if config is None:
        raise UnknownHost(f"no host {name!r} in hosts.toml", hint="See `rbee hosts list`.")
    return config


def _progress(op: Op) -> Callable[[dict[str, Any]], None]:
    """A download reporter that keeps the op's figures (every event: they are cheap)."""

    def report(event: dict[str, Any]) -> None:
        if event.get("phase") != "download":
            return
        op.phase = "downloading"
        if event.get("total") is not None:
            op.total = int(event["total"])
        if event.get("completed") is not None:
            op.bytes = int(event["completed"])

    return report


def _run_op(q: Queen, ops: Ops, op: Op, work: Callable[[], None],
            after: Callable[[], None] = lambda: None) -> None:
    def body() -> None:
        error: RbeeError | None = None
        try:
            work()
        except RbeeError as e:
            error = e
        except Exception as e:  # a bug must end the op, never leave it "running"
            log.exception("%s of %s on %s failed", op.kind, op.model, op.host)
            error = RbeeError(f"internal error: {type(e).__name__}: {e}")
        finally:
            after()
        # the host's picture first, so whoever sees the op end sees its outcome too
        with contextlib.suppress(Exception):
            q.refresh_hosts(names=[op.host])
        ops.finish(op, error)

    threading.Thread(target=body, name=f"ui-{op.id}", daemon=True).start()


def download(q: Queen, ops: Ops, host: str, model: str) -> Op:
    """Download a model to a host in the background (resumable and verified, as always)."""
    from rbee_keeper import provision

    config = _host(q, host)
    spec = model_spec(model)
    if spec.source is None:
        raise InvalidRequest(f"{model} has no source to download from (it was imported on a "
                             "host)", hint="Import the file on that host: `rbee pool models "
                                           "import PATH --id ID --host NAME`.")
    op = ops.add("download", host, spec.id)
    op.phase = "downloading"

    def work() -> None:
        provision.ensure_model(q.session.hive(config), str(spec.source), spec.id, spec.sha256,
                               _progress(op))

    _run_op(q, ops, op, work)
    return op


def _place_on(q: Queen, host: str, model: str, backend: str | None,
              device: int | None, ctx: int | None) -> tuple[Placement, Any]:
    """Where on `host` a new worker for the model fits, by the placement rules; raises with
    every device's reason when it fits nowhere."""
    spec = model_spec(model)
    statuses = q.placement_view()
    status = statuses.get(host)
    if status is None:
        raise HostUnreachable(f"{host} has not answered yet", hint="Try again in a moment.")
    if isinstance(status, RbeeError):
        raise HostUnreachable(f"{host} is unreachable: {status.message}",
                              hint="See the Pool page for why.")
    need, found = need_for(spec, statuses)
    if not found and spec.source is not None:
        from rbee_keeper.probe import probe

        header = probe(spec.source)  # the GGUF header, for the memory estimate
        if header:
            need = dataclasses.replace(need, **header)
    # a worker already serving the model is not a reason to skip the fit check: the user
    # asked for another one
    status = {**status, "workers": [
        {**w, "state": WorkerState.busy.value}
        if w.get("model") == need.id and w.get("state") == WorkerState.ready else w
        for w in status.get("workers", [])]}
    return place({host: status}, need, Constraints(backend, device, ctx)), spec


def start_worker(q: Queen, ops: Ops, host: str, model: str, backend: str | None = None,
                 device: int | None = None, ctx: int | None = None) -> Op:
    """Start a worker for a model on a host (downloading the model first if it is not
    there); the queen then manages it like its own. Refused, with each device's reason,
    when it does not fit."""
    from rbee_keeper import provision

    config = _host(q, host)
    placement, spec = _place_on(q, host, model, backend, device, ctx)
    chosen = placement.chosen
    op = ops.add("start", host, spec.id)
    key = f"ui-{op.id}"
    q.hold(key, {"id": key, "host": host, "model": spec.id, "backend": chosen.backend,
                 "device": chosen.device, "devices": list(chosen.devices),
                 "state": WorkerState.loading.value, "ctx": placement.ctx,
                 "estimate_bytes": placement.estimate.total_bytes if placement.estimate else 0})

    def work() -> None:
        hive = q.session.hive(config)
        if not chosen.has_model:
            op.phase = "downloading"
            provision.ensure_model(hive, str(spec.source), spec.id, spec.sha256, _progress(op))
        op.phase = "loading"
        split = chosen.tensor_split if len(chosen.devices) > 1 else None
        record, token = provision.spawn_worker(hive, SpawnRequest(
            chosen.backend, spec.id, chosen.devices, ctx=placement.ctx, tensor_split=split))
        q.manage_started(host, record, token, config.worker_url(record["port"]), spec.id)
        op.worker = record["id"]

    _run_op(q, ops, op, work, after=lambda: q.release(key))
    return op


def worker_logs(q: Queen, host: str, worker_id: str, lines: int) -> list[str]:
    """The last lines of a worker's log, from its host."""
    return q.session.hive(_host(q, host)).logs(worker_id, lines)


# the pool at a glance


def _device(d: dict[str, Any], workers: list[dict[str, Any]], reserve: int) -> dict[str, Any]:
    """One device's memory as the bar shows it: rbee's workers (by their estimates), other
    programs, the reserve, and what is left."""
    backend, index = d["backend"], d["index"]
    total, free = d.get("memory_total"), d.get("memory_free")
    rbee = held_bytes(workers, backend, index) + promised_bytes(workers, backend, index)
    out = {"backend": backend, "index": index, "name": d.get("name"), "total": total,
           "free": free, "limit": d.get("memory_limit"), "rbee": rbee,
           "workers": [w["id"] for w in workers if w.get("backend") == backend
                       and index in worker_devices(w)]}
    if total is None or free is None:
        return {**out, "others": None, "reserve": reserve, "available": None}
    used = max(total - free, 0)
    # a CPU worker's weights sit in the page cache, which counts as free: never show rbee
    # holding more than is used at all
    shown = min(rbee, used)
    return {**out, "rbee": shown, "rbee_estimate": rbee, "others": used - shown,
            "reserve": min(reserve, free), "available": max(free - reserve, 0)}


def _workers(name: str, status: dict[str, Any], managed: dict[tuple[str, str], dict[str, Any]],
             now: float) -> list[dict[str, Any]]:
    out = []
    for w in status.get("workers", []):
        m = managed.get((name, w.get("id", "")))
        starting = str(w.get("id", "")).startswith(("reserved-", "ui-"))
        started = m["started"] if m else _epoch(w.get("created_at"))
        out.append({
            "id": None if starting else w.get("id"), "model": w.get("model"),
            "backend": w.get("backend"), "devices": worker_devices(w),
            "state": "starting" if starting else (m["state"] if m else w.get("state")),
            "managed": m is not None, "port": w.get("port"), "ctx": w.get("ctx"),
            "uptime_s": round(now - started, 1) if started else None,
            "requests": m["requests"] if m else None, "tokens": m["tokens"] if m else None,
            "tokens_per_sec": m["tokens_per_sec"] if m else None,
            "estimate_bytes": w.get("estimate_bytes")})
    return out


def _epoch(iso: Any) -> float | None:
    if not isinstance(iso, str):
        return None
    from datetime import datetime

    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def pool_doc(q: Queen, ops: Ops) -> dict[str, Any]:
    """Every host (reachable or why not, heartbeat age), its devices' memory, its workers;
    the queue, the running jobs, downloads and starts in progress."""
    now = time.time()
    state = q.state_doc()
    view = q.placement_view()
    managed = {(w["host"], w["id"]): w for w in state["workers"]}
    hosts = []
    for h in state["hosts"]:
        status = h["status"] or {}
        picture = view.get(h["name"])
        workers = picture.get("workers", []) if isinstance(picture, dict) else []
        reserve = int(status.get("reserve_bytes") or 0)
        info = status.get("host") or {}
        hosts.append({
            "name": h["name"], "ok": h["ok"], "source": h["source"], "age_s": h["age_s"],
            "error": h["error"], "hostname": info.get("hostname"),
            "platform": info.get("platform"), "machine": info.get("machine"),
            "rbee_version": info.get("rbee_version"), "reserve": reserve,
            "backends": status.get("backends", []),
            "devices": [_device(d, workers, reserve) for d in status.get("devices", [])],
            "workers": _workers(h["name"], {"workers": workers}, managed, now),
            "models": sorted(m["id"] for m in status.get("models", []))})
    busy = [w for w in state["workers"] if w["state"] == "busy"]
    return {
        "schema": "rbee.queen.pool/v1", "now": now, "uptime_s": state["uptime_s"],
        "hosts": hosts, "queue": state["queue"], "running": state["running"],
        "failures": state["failures"], "ops": ops.list(),
        "totals": {"hosts": len(hosts), "hosts_up": sum(1 for h in hosts if h["ok"]),
                   "devices": sum(len(h["devices"]) for h in hosts),
                   "workers": sum(1 for h in hosts for w in h["workers"] if w["id"]),
                   "busy": len(busy), "queued": len(state["queue"]),
                   "running": len(state["running"]),
                   "tokens_per_sec": round(sum(w["tokens_per_sec"] for w in busy), 2),
                   "jobs": dict(q.metrics.jobs)},
    }


def _steady(doc: dict[str, Any]) -> str:
    """The doc less what changes with the clock alone: sent again only when this differs."""
    return json.dumps({**doc, "now": None, "uptime_s": None,
                       "hosts": [{**h, "age_s": None} for h in doc["hosts"]],
                       "queue": [{**j, "waiting_s": None} for j in doc["queue"]],
                       "ops": doc["ops"]}, sort_keys=True, default=str)


async def pool_events(q: Queen, ops: Ops) -> AsyncIterator[dict[str, Any]]:
    """`pool` whenever the picture changes (and every few seconds), `sample` as the queen
    records chart points."""
    last, sent_at = "", 0.0
    last_sample = time.time()
    next_sample_check = 0.0
    while True:
        doc = await asyncio.to_thread(pool_doc, q, ops)
        key = _steady(doc)
        now = time.monotonic()
        if key != last or now - sent_at >= STREAM_REFRESH_S:
            yield sse("pool", doc)
            last, sent_at = key, now
        if now >= next_sample_check:
            next_sample_check = now + 1.0
            fresh = await asyncio.to_thread(q.store.samples, last_sample + 1e-6)
            for s in fresh:
                yield sse("sample", s)
                last_sample = s["at"]
        await asyncio.sleep(STREAM_TICK_S)


# HTTP


class DownloadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field(min_length=1, max_length=64)
    model: str = Field(min_length=1, max_length=512)


class StartBody(DownloadBody):
    backend: str | None = Field(default=None, max_length=16)
    device: int | None = Field(default=None, ge=0, le=64)
    ctx: int | None = Field(default=None, ge=64, le=1_048_576)


def queen_of(request: Request) -> Queen:
    return request.app.state.queen  # type: ignore[no-any-return]


STATUS = {"INVALID_REQUEST": 400, "INVALID_MODEL_REF": 400, "UNKNOWN_HOST": 404,
          "MODEL_NOT_FOUND": 404, "WORKER_NOT_FOUND": 404, "INSUFFICIENT_RAM": 409,
          "INSUFFICIENT_VRAM": 409, "NO_PLACEMENT": 409, "HOST_UNREACHABLE": 502}


def guard(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    async def handler(request: Request) -> Response:
        try:
            return await fn(request)
        except HTTPError as e:
            return error_response(e.err, e.status, e.headers)
        except RbeeError as e:
            return error_response(e, STATUS.get(e.code, 500))

    return handler


async def get_pool(request: Request) -> Response:
    return JSONResponse(await asyncio.to_thread(pool_doc, queen_of(request), ops_of(request)))


async def get_pool_events(request: Request) -> Response:
    return event_stream(pool_events(queen_of(request), ops_of(request)))


def throughput(q: Queen, since: float, bucket_s: int = 60) -> list[list[float]]:
    """Tokens per second delivered, by the minute each job ended in (every minute since
    `since`, zeros included): the samples' decode rate misses jobs shorter than their
    interval. Read from the job table through a read-only connection of its own."""
    import sqlite3

    first = int(since // bucket_s) * bucket_s
    totals = dict.fromkeys(range(first, int(time.time()) + 1, bucket_s), 0)
    db = sqlite3.connect(f"file:{q.store.path}?mode=ro", uri=True, timeout=2)
    try:
        rows = db.execute(f"SELECT CAST(updated / {bucket_s} AS INTEGER) * {bucket_s}, "
                          "SUM(tokens) FROM jobs WHERE updated >= ? AND state IN "
                          "('done', 'cancelled', 'failed') GROUP BY 1", (first,)).fetchall()
    finally:
        db.close()
    for at, tokens in rows:
        if at in totals:
            totals[at] = tokens or 0
    return [[at, round(n / bucket_s, 3)] for at, n in sorted(totals.items())]


async def get_samples(request: Request) -> Response:
    raw = request.query_params.get("since_s", str(int(SAMPLE_KEEP_S)))
    if not raw.isdigit() or not 1 <= int(raw) <= SAMPLE_KEEP_S:
        raise HTTPError(400, InvalidRequest(f"since_s: seconds back, 1 to {int(SAMPLE_KEEP_S)}",
                                            field="since_s", hint=HINT))
    q = queen_of(request)
    since = time.time() - int(raw)
    samples = await asyncio.to_thread(q.store.samples, since)
    delivered = await asyncio.to_thread(throughput, q, since)
    return JSONResponse({"schema": "rbee.queen.samples/v1",
                         "interval_s": q.settings.sample_interval, "samples": samples,
                         "throughput": {"bucket_s": 60, "tokens_per_sec": delivered}})


async def post_download(request: Request) -> Response:
    body: DownloadBody = await read_model(request, DownloadBody, hint=HINT)
    op = await asyncio.to_thread(download, queen_of(request), ops_of(request), body.host,
                                 body.model)
    return JSONResponse({"schema": "rbee.queen.op/v1", **op.to_dict()}, status_code=202)


async def post_start(request: Request) -> Response:
    body: StartBody = await read_model(request, StartBody, hint=HINT)
    op = await asyncio.to_thread(start_worker, queen_of(request), ops_of(request), body.host,
                                 body.model, body.backend, body.device, body.ctx)
    return JSONResponse({"schema": "rbee.queen.op/v1", **op.to_dict()}, status_code=202)


async def get_ops(request: Request) -> Response:
    return JSONResponse({"schema": "rbee.queen.ops/v1", "ops": ops_of(request).list()})


async def get_logs(request: Request) -> Response:
    raw = request.query_params.get("lines", "200")
    if not raw.isdigit() or not 1 <= int(raw) <= 5000:
        raise HTTPError(400, InvalidRequest("lines: 1 to 5000", field="lines", hint=HINT))
    p = request.path_params
    lines = await asyncio.to_thread(worker_logs, queen_of(request), p["host"], p["worker"],
                                    int(raw))
    return JSONResponse({"schema": "rbee.queen.logs/v1", "host": p["host"],
                         "worker": p["worker"], "lines": lines})


def routes() -> list[Route]:
    return [
        Route("/v2/pool", guard(get_pool), methods=["GET"]),
        Route("/v2/pool/events", guard(get_pool_events), methods=["GET"]),
        Route("/v2/samples", guard(get_samples), methods=["GET"]),
        Route("/v2/ops", guard(get_ops), methods=["GET"]),
        Route("/v2/models/download", guard(post_download), methods=["POST"]),
        Route("/v2/workers/start", guard(post_start), methods=["POST"]),
        Route("/v2/workers/{host}/{worker}/logs", guard(get_logs), methods=["GET"]),
    ]
