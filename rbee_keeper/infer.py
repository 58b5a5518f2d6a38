"""`rbee infer` as steps: choose a worker, provision it, dispatch the job to it.

    choose     a known worker that answers /health (warm: no SSH at all), else every
               host's status in parallel → placement (filter, then score, with reasons)
    provision  download the model if the chosen host lacks it, spawn a worker if none
               serves it (or adopt the idle one placement chose), remember it
    dispatch   stream the job's tokens; wait out a busy worker for a bounded time

`run()` chains them for the daemonless CLI. A queue (the queen) can sit between the steps:
each takes plain data and returns plain data, and a `Cancel` object — set from any thread
(Ctrl+C in the CLI, a cancel call in the queen) — stops the job between steps and, while it
streams, on the worker itself.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
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
from rbee_common.names import HealthStatus
from rbee_common.progress import Reporter, null_reporter
from rbee_keeper import cache
from rbee_keeper.errors import NoPlacement, UnknownHost
from rbee_keeper.hostsfile import host_names
from rbee_keeper.jobs import new_job_id
from rbee_keeper.worker_client import Busy, Stream, cancel, execute

if TYPE_CHECKING:  # the cold path's modules load only when it runs
    from rbee_keeper.hive import Session
    from rbee_keeper.hosts import HostConfig
    from rbee_keeper.placement import ModelNeed, Placement
    from rbee_keeper.provision import SplitRun

SCHEMA = "rbee.infer/v1"
WARM_REASON = "known worker answered /health"


@dataclass(frozen=True)
class InferRequest:
    model: str
    prompt: str
    hosts: tuple[str, ...] = ()
    backend: str | None = None
    device: tuple[int, ...] | None = None  # one device, or several GPUs of one host
    ctx: int | None = None
    max_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    seed: int | None = None
    stop: tuple[str, ...] = ()
    busy_wait: float = 30.0
    status_timeout: float = 20.0
    split: tuple[str, ...] = ()  # one model across these hosts (llama.cpp RPC), first runs it
    insecure_rpc: bool = False  # lenders on the LAN, reached directly rather than over SSH

    def body(self, job_id: str) -> dict[str, Any]:
        return {"job_id": job_id, "prompt": self.prompt, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "seed": self.seed, "stop": list(self.stop)}


class Cancel:
    """A job's cancel signal, safe to set from any thread.

    Steps call `check()` between them; while a job streams, `on_cancel` hooks (POST /cancel
    to its worker) run as soon as it is set, so the worker stops within one token.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._hooks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            hooks = list(self._hooks)
        for hook in hooks:
            hook()

    @contextmanager
    def hook(self, fn: Callable[[], None]) -> Iterator[None]:
        """Run `fn` if the job is cancelled while the block runs (at once if it already is)."""
        with self._lock:
            self._hooks.append(fn)
            already = self._event.is_set()
        if already:
            fn()
        try:
            yield
        finally:
            with self._lock:
                self._hooks.remove(fn)

    def check(self, job_id: str) -> None:
        if self._event.is_set():
            raise Interrupted(f"cancelled job {job_id}", hint="", job_id=job_id)


@dataclass
class Choice:
    """Where a job will run: a known worker (warm), or a placement to provision (cold)."""

    model: str
    worker: cache.KnownWorker | None = None
    placement: Placement | None = None
    spec: ModelSpec | None = None
    wait: float = 0.0  # how long dispatch may wait for a busy worker
    fallbacks: list[cache.KnownWorker] = field(default_factory=list)  # busy, known workers

    @property
    def path(self) -> str:
        return "cold" if self.placement is not None else "warm"


@dataclass
class Context:
    """What a job's steps share: hosts, one hive session, progress and timings."""

    hosts: dict[str, HostConfig]
    session: Session
    report: Reporter = null_reporter
    timings: dict[str, float] = field(default_factory=dict)
    split_run: SplitRun | None = None  # a split worker and its lenders, ended with the job

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = (time.perf_counter() - t0) * 1000


def check_hosts(req: InferRequest) -> set[str]:
    """The host names the job may use (all of hosts.toml, or its --host ones)."""
    names = host_names()
    unknown = (set(req.hosts) | set(req.split)) - names
    if unknown:
        raise UnknownHost(f"no host {sorted(unknown)[0]!r} in hosts.toml "
                          f"(known: {', '.join(sorted(names))})")
    if req.split:
        return set(req.split)
    return set(req.hosts) or names


def warm_workers(req: InferRequest, names: set[str]) -> tuple[list[cache.KnownWorker],
                                                               list[cache.KnownWorker]]:
    """Known workers for the model that answer /health as themselves: (idle, busy).

    A worker that does not answer, or answers as another worker, is forgotten.
    """
    idle, busy = [], []
    for known in cache.matching(req.model, names, req.backend, req.device, req.ctx):
        health = get_health(known.url, timeout=1.0)
        if not health or health.get("worker_id") != known.id or health.get("model") != known.model:
            cache.forget(known.id, known.host)
            continue
        (busy if health.get("status") == HealthStatus.busy else idle).append(known)
    return idle, busy


def choose(req: InferRequest, ctx: Context) -> Choice:
    """Place the job: every host's status in parallel, then filter and score."""
    from rbee_keeper.placement import Constraints, place
    from rbee_keeper.pool import statuses

    spec = _spec(req.model)
    with ctx.timed("status_ms"):
        outcomes = statuses(ctx.hosts, ctx.session, req.status_timeout)
    states: dict[str, dict[str, Any] | RbeeError] = {
        o.name: o.value if o.ok and o.value is not None else o.error or RbeeError("no status")
        for o in outcomes}
    need = _need(spec, states, ctx)
    placement = place(states, need, Constraints(req.backend, req.device, req.ctx,
                                                split=req.split or None))
    chosen = placement.chosen
    ctx.report({"event": "log", "message": f"rbee: {spec.id} → {chosen.label} ({chosen.why()})"})
    return Choice(model=spec.id, placement=placement, spec=spec)


def provision(choice: Choice, req: InferRequest, ctx: Context) -> cache.KnownWorker:
    """Make the chosen worker exist: adopt an idle one, or download and spawn."""
    from rbee_keeper import provision as prov
    from rbee_keeper.hive import SpawnRequest

    if choice.worker is not None:
        return choice.worker
    assert choice.placement is not None and choice.spec is not None
    spec, placement = choice.spec, choice.placement
    chosen = placement.chosen
    hive = ctx.session.hive(ctx.hosts[chosen.host])
    if chosen.worker is not None:
        return prov.adopt_worker(hive, chosen.worker, req.model)
    if not chosen.has_model:
        with ctx.timed("download_ms"):
            prov.ensure_model(hive, str(spec.source), spec.id, spec.sha256, ctx.report)
    if chosen.split is not None:  # across hosts: lenders, tunnels, then the worker
        ctx.split_run = prov.SplitRun(hive)
        hives = {h: ctx.session.hive(ctx.hosts[h]) for h in chosen.split.hosts}
        with ctx.timed("spawn_ms"):
            return ctx.split_run.start(
                chosen.split, hives, SpawnRequest(chosen.backend, spec.id, chosen.devices,
                                                  ctx=placement.ctx,
                                                  tensor_split=chosen.tensor_split),
                req.model, ctx.report, direct=req.insecure_rpc)
    with ctx.timed("spawn_ms"):
        split = chosen.tensor_split if len(chosen.devices) > 1 else None
        return prov.start_worker(hive, SpawnRequest(chosen.backend, spec.id, chosen.devices,
                                                    ctx=placement.ctx, tensor_split=split),
                                 req.model, ctx.report)


def dispatch(worker: cache.KnownWorker, req: InferRequest, job_id: str,
             on_text: Callable[[str], None], cancel_: Cancel, wait: float) -> Stream:
    """Stream the job on the worker; on 503, retry after Retry-After for up to `wait` s."""
    deadline = time.monotonic() + wait
    url = worker.url
    got: list[str] = []  # what arrived, kept in the error if the user stops the job

    def collect(t: str) -> None:
        got.append(t)
        on_text(t)

    with cancel_.hook(lambda: cancel(url, worker.token, job_id)):
        while True:
            cancel_.check(job_id)
            try:
                return execute(url, worker.token, req.body(job_id), collect)
            except Busy as e:
                if time.monotonic() + e.retry_after > deadline:
                    if wait <= 0:
                        raise
                    raise AllSlotsBusy(f"the worker at {url} stayed busy for {wait:g}s",
                                       worker=url) from e
                time.sleep(e.retry_after)
            except KeyboardInterrupt:  # Ctrl+C in the thread that streams: cancel the job
                cancel_.cancel()
                raise Interrupted(f"cancelled job {job_id} after {len(got)} tokens", hint="",
                                  job_id=job_id, tokens=len(got), text="".join(got)) from None


def run(req: InferRequest, on_text: Callable[[str], None], report: Reporter = null_reporter,
        accept_new_host_key: bool = False, job_id: str | None = None,
        cancel_: Cancel | None = None) -> dict[str, Any]:
    """Choose, provision and dispatch one job; return the `rbee.infer/v1` document."""
    t0 = time.perf_counter()
    job_id = job_id or new_job_id()
    cancel_ = cancel_ or Cancel()
    names = check_hosts(req)
    idle, busy = warm_workers(req, names) if not req.split else ([], [])
    for known in idle:  # warm: no SSH at all
        cancel_.check(job_id)
        try:
            stream = dispatch(known, req, job_id, on_text, cancel_, wait=0.0)
        except Busy:
            busy.append(known)  # taken since /health said idle
            continue
        except WorkerCrashed as e:
            cache.forget(known.id, known.host)
            if e.details.get("tokens"):
                raise crashed(e, known) from None
            continue  # died before saying anything: go cold
        return document(Choice(known.model, worker=known), stream, known, {}, t0, job_id)
    from rbee_keeper.hive import Session
    from rbee_keeper.hosts import select

    with ExitStack() as held:
        session = held.enter_context(Session(accept_new_host_key))
        ctx = Context(select(sorted(names)), session, report)
        held.callback(lambda: ctx.split_run and ctx.split_run.close())
        cancel_.check(job_id)
        try:
            choice = choose(req, ctx)
            cancel_.check(job_id)
            worker = provision(choice, req, ctx)
        except (NoPlacement, InsufficientMemory):
            if not busy:
                raise
            worker = busy[0]  # nowhere to start another worker: wait for the busy one
            choice = Choice(worker.model, worker=worker)
            report({"event": "log", "message": f"rbee: waiting for busy worker {worker.id}"})
        if ctx.split_run is None:
            held.close()  # done with SSH; a split job keeps it for its tunnels
        try:
            stream = dispatch(worker, req, job_id, on_text, cancel_, wait=req.busy_wait)
        except WorkerCrashed as e:
            cache.forget(worker.id, worker.host)
            if ctx.split_run is not None:
                lost = ctx.split_run.lost_lenders()
                if lost:
                    e.message += f"; lender lost: {', '.join(lost)}"
                    e.details["lenders_lost"] = lost
            raise crashed(e, worker) from None
    return document(choice, stream, worker, ctx.timings, t0, job_id)


def crashed(e: WorkerCrashed, worker: cache.KnownWorker) -> WorkerCrashed:
    """The crash as the user can act on it: which worker, where its log is, what arrived."""
    e.details.update(worker_id=worker.id, host=worker.host)
    e.hint = (f"Read its log: rbee pool worker logs {worker.id} --host {worker.host}; the "
              "next rbee infer starts a new worker.")
    return e


def _spec(ref: str) -> ModelSpec:
    """The controller's view of a reference; an unknown plain id may be a host's import."""
    from rbee_common.catalog import resolve_ref

    try:
        return resolve_ref(ref)
    except ModelNotFound:
        if not ID_RE.match(ref):
            raise
        return ModelSpec(ref, ref, None)  # type: ignore[arg-type]


def _need(spec: ModelSpec, states: dict[str, dict[str, Any] | RbeeError],
          ctx: Context) -> ModelNeed:
    """The model's figures from a host that has it, else from its GGUF header (a Range
    request for the first megabytes), else from the reference alone."""
    from rbee_keeper.placement import need_for

    need, found = need_for(spec, states)
    if found or spec.source is None:
        return need
    from rbee_keeper.probe import probe

    with ctx.timed("probe_ms"):
        header = probe(spec.source)
    return dataclasses.replace(need, **header) if header else need


def placement_doc(choice: Choice, worker: cache.KnownWorker) -> dict[str, Any]:
    """The `placement` of an infer document: the same keys on the warm and the cold path."""
    if choice.placement is not None:
        return {"path": choice.path, **choice.placement.to_dict()}
    return {"path": choice.path,
            "chosen": {"host": worker.host, "backend": worker.backend, "device": worker.device,
                       "devices": list(worker.devices or (worker.device,)), "tensor_split": [],
                       "reason": WARM_REASON, "worker": worker.id, "split": None},
            "ctx": worker.ctx, "estimate": None, "rejected": []}


def document(choice: Choice, stream: Stream, worker: cache.KnownWorker,
             timings: dict[str, float], t0: float, job_id: str) -> dict[str, Any]:
    end = stream.end or {}
    return {
        "schema": SCHEMA,
        "job_id": job_id,
        "model": choice.model,
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
        "host": worker.host,
        "worker": {"id": worker.id, "url": worker.url, "backend": worker.backend,
                   "device": worker.device},
        "placement": placement_doc(choice, worker),
    }


def run_via_queen(req: InferRequest, on_text: Callable[[str], None],
                  report: Reporter = null_reporter) -> dict[str, Any]:
    """The same job through the queen (`queen_url` is set): same document, same errors."""
    from rbee_keeper.queen_client import QueenClient, follow, target

    if (req.hosts or req.backend or req.device is not None or req.ctx is not None
            or req.split or req.insecure_rpc):
        from rbee_common.errors import UsageError

        raise UsageError("--host, --backend, --device, --ctx and --split are the daemonless "
                         "path's: the queen places jobs itself (and does not split a model "
                         "across hosts yet)",
                         hint="Leave them out, or unset queen_url / RBEE_QUEEN_URL.")
    t0 = time.perf_counter()
    client = QueenClient(target())
    body = {"model": req.model, "prompt": req.prompt, "max_tokens": req.max_tokens,
            "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
            "seed": req.seed, "stop": list(req.stop)}
    job_id = client.submit(body)["id"]
    seen: dict[str, dict[str, Any]] = {}
    first: list[float] = []

    def on_event(event: Any) -> None:
        if event.event in ("placed", "started"):
            seen[event.event] = event.json()
        elif event.event in ("evicting", "loading"):
            report({"event": "log", "message": f"rbee: {event.event} {event.data}"})

    def text(t: str) -> None:
        if not first:
            first.append(time.perf_counter())
        on_text(t)

    end = follow(client, job_id, text, on_event)
    job = client.task(job_id)
    placed = seen.get("placed", {})
    chosen = {k: placed.get(k) for k in ("host", "backend", "device", "reason", "worker")}
    chosen["devices"] = placed.get("devices") or [placed.get("device")]
    chosen["tensor_split"] = placed.get("tensor_split") or []
    chosen["split"] = placed.get("split")
    chosen["worker"] = chosen["worker"] or job.get("worker")
    timings = dict(job.get("timings") or {})
    return {
        "schema": SCHEMA, "job_id": job_id, "model": job["model"], "text": job.get("text", ""),
        "tokens": int(end.get("tokens_out", job.get("tokens", 0))),
        "prompt_tokens": end.get("prompt_tokens"), "stop_reason": end.get("stop_reason"),
        "timings": {"ttft_ms": round((first[0] - t0) * 1000, 2) if first else 0.0,
                    "tokens_per_sec": end.get("tokens_per_sec"),
                    "total_ms": round((time.perf_counter() - t0) * 1000, 2),
                    "stream_ms": timings.get("stream_ms"),
                    "worker_ttft_ms": end.get("ttft_ms")},
        "host": job.get("host"),
        "worker": {"id": job.get("worker"), "url": seen.get("started", {}).get("url"),
                   "backend": placed.get("backend"), "device": placed.get("device")},
        "placement": {"path": placed.get("path", "cold"), "chosen": chosen,
                      "ctx": placed.get("ctx"), "estimate": placed.get("estimate"),
                      "rejected": placed.get("rejected", [])},
    }


def uses_queen() -> bool:
    """Whether `rbee infer` goes through a queen (queen_url in config.toml or RBEE_QUEEN_URL)."""
    import os

    if os.environ.get("RBEE_QUEEN_URL"):
        return True
    from rbee_keeper.queen_client import config_path, configured_url

    return config_path().is_file() and configured_url() is not None
