"""The queen's runtime: a bounded job queue, a scheduler that places jobs on the pool, job
threads that provision and stream, and the housekeeping that keeps workers honest (host
polling, idle TTL, crash backoff).

Decisions are the core's: placement (`rbee_keeper.placement`), eviction, TTL, backoff and
"another worker?" (`rbee_keeper.lifecycle`), provisioning (`rbee_keeper.provision`), the job
state machine (`rbee_keeper.jobs`). This module sequences them, persists every transition
(`queen.store`) before acting on it, and turns what happens into job events.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rbee_common.errors import (
    InsufficientMemory,
    InvalidRequest,
    RbeeError,
    Unauthorized,
    WorkerCrashed,
)
from rbee_common.models import ModelSpec
from rbee_common.names import StopReason, WorkerState
from rbee_keeper import lifecycle, provision
from rbee_keeper.errors import NoPlacement, UnknownHost
from rbee_keeper.fanout import fan_out
from rbee_keeper.hive import Session, SpawnRequest
from rbee_keeper.hosts import HostConfig
from rbee_keeper.jobs import JobEventName, JobRequest, JobState, new_job_id
from rbee_keeper.placement import Constraints, ModelNeed, Placement, need_for, place
from rbee_keeper.queen.live import HostView, LiveJob, ManagedWorker
from rbee_keeper.queen.store import Store
from rbee_keeper.queen.tokens import ANY_HOST
from rbee_keeper.worker_client import Busy, cancel, execute

log = logging.getLogger("rbee.queen")
HEARTBEAT_HINT = "Heartbeats come from `rbee-hive daemon` of the same rbee version."

E = JobEventName
SAVE_PROGRESS_S = 1.0  # how often a streaming job's tokens so far are written to the store


class QueueFull(RbeeError):
    """The queen's queue is full: the client should retry after Retry-After seconds."""

    code = "QUEUE_FULL"
    default_hint = "Retry after the Retry-After seconds, or raise the queue size (--queue-size)."


class JobNotFound(RbeeError):
    """No job with this id."""

    code = "JOB_NOT_FOUND"
    default_hint = "List jobs with `rbee jobs list`."


class WorkerBusy(RbeeError):
    """The worker is running a job: it is not stopped under it."""

    code = "WORKER_BUSY"



class _Doc(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class _Device(_Doc):
    backend: str
    index: int = Field(ge=0)
    memory_total: int | None = Field(default=None, ge=0)
    memory_free: int | None = Field(default=None, ge=0)
    memory_limit: int | None = Field(default=None, ge=0)


class _Worker(_Doc):
    id: str
    state: str
    backend: str
    model: str | None = None
    port: int | None = Field(default=None, ge=0, le=65535)
    device: int | None = Field(default=None, ge=0)
    devices: list[int] | None = None
    ctx: int | None = Field(default=None, ge=0)
    estimate_bytes: int | None = Field(default=None, ge=0)


class _Model(_Doc):
    id: str
    source: str


class _Status(_Doc):
    """What placement, reconciling and the models document read of a host's status."""

    devices: list[_Device]
    workers: list[_Worker]
    models: list[_Model] = Field(default_factory=list)
    lenders: list[dict[str, Any]] = Field(default_factory=list)


def status_problem(status: dict[str, Any]) -> str | None:
    """What a host status lacks that the queen reads (None when nothing): a heartbeat's
    status is stored as it came, and one bad field would fail every later placement."""
    try:
        _Status.model_validate(status)
    except ValidationError as e:
        first = e.errors()[0]
        return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    return None

class QueenRestarted(RbeeError):
    """The queen stopped while the job was placed or running."""

    code = "QUEEN_RESTARTED"
    default_hint = "Submit the job again."


@dataclass(frozen=True)
class QueenSettings:
    queue_size: int = 64
    ttl: float = lifecycle.DEFAULT_TTL  # default idle TTL of a worker, seconds (0 = never)
    poll_interval: float = 2.0  # how often hosts without a fresh heartbeat are asked
    status_timeout: float = 20.0
    busy_wait: float = 30.0
    sample_interval: float = 5.0
    max_workers_per_model: int = lifecycle.MAX_WORKERS_PER_MODEL


@dataclass
class Plan:
    """What the scheduler decided for one job."""

    worker: ManagedWorker | None = None  # run on this (already marked busy)
    placement: Placement | None = None  # or start a worker here
    victims: tuple[lifecycle.Idle, ...] = ()  # after stopping these
    reason: str = ""


@dataclass
class Failures:
    count: int = 0
    last: float = 0.0
    error: dict[str, Any] | None = None


@dataclass
class Metrics:
    jobs: dict[str, int] = field(default_factory=dict)  # by outcome
    evictions: int = 0
    ttl_stops: int = 0
    ttft_sum_s: float = 0.0
    ttft_count: int = 0
    tokens: int = 0
    last_tokens_per_sec: float = 0.0


class Queen:
    def __init__(self, settings: QueenSettings, store: Store,
                 hosts: Callable[[], dict[str, HostConfig]],
                 session: Session | None = None) -> None:
        self.settings = settings
        self.store = store
        self.load_hosts = hosts
        self.session = session or Session()
        self.cond = threading.Condition(threading.RLock())
        self.queue: list[LiveJob] = []
        self.jobs: dict[str, LiveJob] = {}
        self.workers: dict[tuple[str, str], ManagedWorker] = {}
        self.hosts: dict[str, HostView] = {}
        self.reservations: dict[str, dict[str, Any]] = {}  # job id → fake loading worker
        self.failures: dict[str, Failures] = {}
        self.headers: dict[str, Any] = {}  # model id → its GGUF header figures (probe)
        self.polling: set[str] = set()  # hosts being asked for their status right now
        self.metrics = Metrics()
        self.started = time.time()
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # life

    def start(self) -> None:
        self._recover()
        self.refresh_hosts(force=True)
        for name, fn in (("scheduler", self._schedule_loop), ("poller", self._poll_loop),
                         ("reaper", self._reap_loop), ("sampler", self._sample_loop)):
            t = threading.Thread(target=fn, name=f"queen-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self.stopping.set()
        with self.cond:
            self.cond.notify_all()
        for job in list(self.jobs.values()):
            if not job.final:
                job.cancel.cancel()
        for t in self._threads:
            t.join(timeout=5)
        self.session.close()

    def _recover(self) -> None:
        """After a restart: jobs that were running failed, queued ones wait again, workers
        that still answer are kept."""
        for row in self.store.interrupted_jobs():
            state = JobState(row["state"])
            err = QueenRestarted(f"the queen stopped while this job was {state.value}")
            last = self.store.events(row["id"])
            seq = last[-1][0] + 1 if last else 0
            self.store.transition(row["id"], state, JobState.failed,
                                  events=[(seq, E.error.value, err.to_dict())],
                                  error=err.to_dict())
            self._count("failed")
        for row in self.store.queued_jobs():
            request = JobRequest.from_dict(row["request"])
            job = LiveJob(row["id"], request, row["source"], JobState.queued,
                          model_id=row["model"], created=row["created"])
            job.events = self.store.events(row["id"])
            self.jobs[job.id] = job
            self.queue.append(job)
        from rbee_common.http import get_health

        for doc in self.store.workers():
            w = ManagedWorker.from_dict(doc)
            health = get_health(w.url, timeout=1.0)
            if health and health.get("worker_id") == w.id:
                self.workers[(w.host, w.id)] = w
            else:
                self.store.drop_worker(w.host, w.id)

    # the API the HTTP app calls

    def submit(self, req: JobRequest, source: str = "api") -> LiveJob:
        """Queue a job (persisted first); QUEUE_FULL when the queue is at its bound.

        The model reference is checked here, at the edge: an unknown or malformed one is
        refused before anything is queued."""
        spec = model_spec(req.model)
        with self.cond:
            if len(self.queue) >= self.settings.queue_size:
                raise QueueFull(f"the queue holds {len(self.queue)} jobs (its limit)",
                                retry_after=self.retry_after())
            job = LiveJob(new_job_id(), req, source, JobState.queued, model_id=spec.id)
            event = job.next_event(E.queued, {"position": len(self.queue) + 1})
            self.store.add_job(job.id, spec.id, source, req.to_dict(), event)
            self.jobs[job.id] = job
            self.queue.append(job)
            self.cond.notify_all()
        return job

    def retry_after(self) -> int:
        return 2

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        with self.cond:
            job = self.jobs.get(job_id)
            if job is None:
                row = self.store.job(job_id)
                if row is None:
                    raise JobNotFound(f"no job {job_id!r}")
                return {"id": job_id, "state": row["state"], "cancelling": False}
            if job in self.queue:
                self.queue.remove(job)
                self._finish(job, JobState.cancelled, E.end, self._cancelled_end())
                return {"id": job_id, "state": job.state.value, "cancelling": True}
        if not job.final:
            job.cancel.cancel()
        return {"id": job_id, "state": job.state.value, "cancelling": not job.final}

    def live(self, job_id: str) -> LiveJob | None:
        return self.jobs.get(job_id)

    def job_doc(self, job_id: str) -> dict[str, Any]:
        row = self.store.job(job_id)
        if row is None:
            raise JobNotFound(f"no job {job_id!r}")
        job = self.jobs.get(job_id)
        if job is not None and not job.final:
            row["text"] = "".join(job.text)
            row["tokens"] = job.tokens
        if job is not None and job.state is JobState.queued and job in self.queue:
            row["position"] = self.queue.index(job) + 1
        return row

    def set_ttl(self, model: str, ttl: float | None) -> None:
        self.store.set_ttl(model, ttl)

    def ttl_of(self, model: str) -> float:
        ttls = self.store.ttls()
        if model in ttls:
            return ttls[model]
        from rbee_common.catalog import load_catalog

        entry = load_catalog().get(model)
        if entry is not None and entry.ttl is not None:
            return float(entry.ttl)
        return self.settings.ttl

    def heartbeat(self, host: str, status: dict[str, Any], sender: str | None = ANY_HOST
                  ) -> None:
        """A pool daemon pushed its state: the freshest picture there is. Taken from the
        queen's own token or that host's heartbeat token (`sender`), only for a host of
        hosts.toml, and only a hive status this queen can place on (see status_problem)."""
        from rbee_keeper.hive import checked

        if sender not in (ANY_HOST, host):
            raise Unauthorized(f"this heartbeat token is {sender}'s, not {host}'s",
                               hint=HEARTBEAT_HINT)
        if host not in self.load_hosts():
            raise UnknownHost(f"a heartbeat for {host!r}, which is not in hosts.toml",
                              hint="Start the pool daemon from here (rbee pool daemon start "
                                   "--host NAME), or set RBEE_HOST_NAME to the host's name in "
                                   "hosts.toml.")
        problem = status_problem(checked(host, status))
        if problem is not None:
            raise InvalidRequest(f"the heartbeat of {host} is not a hive status: {problem}",
                                 hint=HEARTBEAT_HINT)
        now = time.time()
        with self.cond:
            view = self.hosts.setdefault(host, HostView(host))
            view.status, view.error, view.seen, view.checked = status, None, now, now
            view.source = "heartbeat"
            self._reconcile(host, status, now)
            self.cond.notify_all()

    # hosts

    def refresh_hosts(self, force: bool = False, names: list[str] | None = None) -> None:
        """Ask hosts whose picture is stale (or `names`, or all with `force`) for status."""
        configs = self.load_hosts()
        now = time.time()
        with self.cond:
            for gone in set(self.hosts) - set(configs):
                del self.hosts[gone]
            stale = [n for n in configs if force or (names and n in names) or
                     now - self.hosts.get(n, HostView(n)).seen > self.settings.poll_interval]
        if not stale:
            return
        asked = time.time()
        outcomes = fan_out(stale, lambda n: self.session.hive(configs[n]).status(
            timeout=self.settings.status_timeout), self.settings.status_timeout)
        with self.cond:
            for o in outcomes:
                self._apply(configs[o.name], o, asked, forced=names is not None)
            self.cond.notify_all()

    def _apply(self, config: HostConfig, o: Any, asked: float, forced: bool) -> None:
        """One host's status (or its error) into its picture. Called with the lock held."""
        now = time.time()
        view = self.hosts.setdefault(o.name, HostView(o.name))
        if not forced and view.source == "heartbeat" and \
                now - view.seen < self.settings.poll_interval:
            return  # a heartbeat arrived meanwhile: fresher than this
        view.checked = now
        view.source = "local" if config.transport == "local" else "ssh"
        if o.ok and o.value is not None:
            view.status, view.error, view.seen = o.value, None, now
            self._reconcile(o.name, o.value, asked)
        else:
            view.error = (o.error or RbeeError("no status")).to_dict()

    def _poll_one(self, config: HostConfig) -> None:
        """Ask one host for its status; each host on its own, so a slow one delays no other."""
        asked = time.time()
        try:
            (o,) = fan_out([config.name], lambda n: self.session.hive(config).status(
                timeout=self.settings.status_timeout), self.settings.status_timeout)
            with self.cond:
                if config.name in self.load_hosts():
                    self._apply(config, o, asked, forced=False)
                self.cond.notify_all()
        finally:
            with self.cond:
                self.polling.discard(config.name)

    def _reconcile(self, host: str, status: dict[str, Any], asked: float) -> None:
        """Forget managed workers the host no longer runs (crashed, stopped by hand); a
        worker started after the status was asked for is not in it yet, and stays."""
        # a worker that is slow to answer its /health ("error") is still there: only a dead
        # process, or a record gone, means the worker is
        alive = {w["id"] for w in status.get("workers", []) if w.get("state") != WorkerState.dead}
        for w in list(self.workers.values()):
            if w.host == host and w.id not in alive and w.started < asked:
                log.warning("worker %s on %s is gone", w.id, host)
                self._forget(host, w.id)

    def _forget(self, host: str, worker_id: str) -> None:
        """A worker is no more (stopped, evicted, crashed): out of the queen's books, its
        record, and the host's cached picture, so no decision offers it again."""
        with self.cond:
            self.workers.pop((host, worker_id), None)
            view = self.hosts.get(host)
            if view is not None and view.status is not None:
                view.status = {**view.status, "workers": [
                    w for w in view.status.get("workers", []) if w.get("id") != worker_id]}
        self.store.drop_worker(host, worker_id)

    def _statuses(self) -> dict[str, dict[str, Any] | RbeeError]:
        """Host statuses for placement: the cached pictures, with the memory that workers
        being started will take added as loading workers."""
        out: dict[str, dict[str, Any] | RbeeError] = {}
        for name, view in self.hosts.items():
            if view.status is None:
                err = view.error or {"code": "HOST_UNREACHABLE", "message": "no status yet"}
                from rbee_common.errors import RemoteError

                out[name] = RemoteError(str(err.get("code")), str(err.get("message")))
                continue
            status = copy.deepcopy(view.status)
            listed = set()
            for w in status.get("workers", []):
                listed.add(w.get("id"))
                managed = self.workers.get((name, w.get("id")))
                if managed is not None:  # the queen knows better than a status seconds old
                    w["state"] = (WorkerState.ready if managed.state == "idle"
                                  else WorkerState.busy).value
            status["workers"] += [  # started since that status: they hold memory too
                {"id": w.id, "model": w.model, "backend": w.backend, "device": w.devices[0],
                 "devices": list(w.devices), "ctx": w.ctx, "estimate_bytes": w.estimate_bytes,
                 "state": (WorkerState.ready if w.state == "idle" else WorkerState.busy).value}
                for w in self.workers.values() if w.host == name and w.id not in listed]
            status["workers"] = [*status.get("workers", []),
                                 *(r for r in self.reservations.values() if r["host"] == name)]
            out[name] = status
        return out

    # scheduling

    def _schedule_loop(self) -> None:
        while not self.stopping.is_set():
            with self.cond:
                try:
                    started = self._schedule_once()
                except Exception:  # a bug must not end scheduling for every later job
                    log.exception("scheduling failed")
                    started = False
                if not started:
                    self.cond.wait(timeout=1.0)

    def _schedule_once(self) -> bool:
        """Place what can be placed now, oldest first; True if any job started."""
        started = False
        for job in list(self.queue):
            if job.cancel.cancelled:
                continue
            try:
                plan = self._decide(job)
            except RbeeError as e:
                self.queue.remove(job)
                self._fail(job, e)
                continue
            except Exception as e:  # a bug fails this job, not the scheduler (nor its restart)
                log.exception("placing job %s failed", job.id)
                self.queue.remove(job)
                self._fail(job, RbeeError(f"internal error: {type(e).__name__}: {e}"))
                continue
            if plan is None:
                continue
            self.queue.remove(job)
            self._notify_positions()
            t = threading.Thread(target=self._run, args=(job, plan), name=f"job-{job.id}",
                                 daemon=True)
            t.start()
            started = True
        return started

    def _notify_positions(self) -> None:
        for i, job in enumerate(self.queue):
            job.next_event(E.queued, {"position": i + 1})

    def _need(self, job: LiveJob,
              statuses: dict[str, dict[str, Any] | RbeeError]) -> ModelNeed | None:
        """What placement needs to know of the job's model; None while its header is read
        (in the background: the scheduler never waits on the network)."""
        spec = model_spec(job.request.model)
        need, found = need_for(spec, statuses)
        if found or spec.source is None:
            return need
        header = self.headers.get(spec.id, "unknown")
        if header == "unknown":
            self.headers[spec.id] = "pending"

            def read() -> None:
                from rbee_keeper.probe import probe

                got = probe(spec.source)
                with self.cond:
                    self.headers[spec.id] = got
                    self.cond.notify_all()

            threading.Thread(target=read, name=f"probe-{spec.id}", daemon=True).start()
            return None
        if header == "pending":
            return None
        return dataclasses.replace(need, **header) if isinstance(header, dict) else need

    def _decide(self, job: LiveJob) -> Plan | None:
        """Run on an idle worker, start one (evicting idle ones if that makes room), wait,
        or fail; None means wait."""
        model = job.model_id
        fails = self.failures.get(model)
        if fails is not None and fails.count > 1:
            wait = lifecycle.crash_backoff(fails.count) - (time.time() - fails.last)
            if wait > 0:
                raise RbeeError(f"{model} failed {fails.count} times in a row; not retrying "
                                f"for {wait:.0f}s (last: {(fails.error or {}).get('message')})",
                                hint="Read the worker log on its host; fix the model or "
                                     "its host, then try again.", **(fails.error or {}))
        mine = [w for w in self.workers.values() if w.model == job.model_id]
        for w in sorted(mine, key=lambda w: -w.last_used):
            if w.state == "idle":
                w.state = "busy"
                return Plan(worker=w, reason=f"idle worker {w.id} already serves the model")
        waiting = sum(1 for j in self.queue if j.model_id == job.model_id)
        starting = sum(1 for r in self.reservations.values() if r["model"] == job.model_id)
        busy = sum(1 for w in mine if w.state == "busy") + starting
        serving = len(mine) + starting  # workers it has, and ones being started for it
        if serving and not lifecycle.wants_another_worker(
                waiting, serving, busy, self.settings.max_workers_per_model):
            return None
        statuses = self._statuses()
        if serving:  # another worker for it goes to another host or device, never beside one
            statuses = _without_devices(statuses, {
                (w.host, w.backend, d) for w in mine for d in w.devices} | {
                (r["host"], r["backend"], d) for r in self.reservations.values()
                if r["model"] == job.model_id for d in r["devices"]})
        need = self._need(job, statuses)
        if need is None:
            return None  # its GGUF header is still being read
        try:
            placement = place(statuses, need, Constraints(auto_split=False))
        except (InsufficientMemory, NoPlacement) as e:
            if serving:
                return None  # its busy (or starting) worker will do
            idle = [lifecycle.Idle(w.id, w.host, w.model, w.backend, w.devices, w.last_used)
                    for w in self.workers.values() if w.state == "idle"]
            plan = lifecycle.plan_eviction(statuses, need, Constraints(auto_split=False), idle)
            if plan is not None:
                self._reserve(job, plan.placement)
                return Plan(placement=plan.placement, victims=plan.victims,
                            reason=plan.reason())
            if self.reservations or any(w.state == "busy" for w in self.workers.values()):
                return None  # memory may come free when a job ends
            raise e
        if placement.chosen.worker is not None:
            return self._adopt(job, placement)
        self._reserve(job, placement)
        return Plan(placement=placement, reason=placement.chosen.why())

    def _adopt(self, job: LiveJob, placement: Placement) -> Plan:
        """An idle worker the queen did not start already serves the model: use it."""
        self._reserve(job, placement, memory=False)
        return Plan(placement=placement, reason=placement.chosen.why())

    def _reserve(self, job: LiveJob, placement: Placement, memory: bool = True) -> None:
        c = placement.chosen
        est = placement.estimate.total_bytes if placement.estimate and memory else 0
        self.reservations[job.id] = {
            "id": f"reserved-{job.id}", "host": c.host, "model": job.model_id,
            "backend": c.backend, "device": c.device, "devices": list(c.devices),
            "state": WorkerState.loading.value, "estimate_bytes": est, "ctx": placement.ctx}

    # running a job (its own thread)

    def _run(self, job: LiveJob, plan: Plan) -> None:
        worker: ManagedWorker | None = plan.worker
        try:
            placed = self._placed_event(job, plan, worker)
            job.placement, job.host = placed[2], placed[2]["host"]
            self._transition(job, JobState.placed, [placed], placement=placed[2],
                             host=placed[2]["host"])
            job.cancel.check(job.id)
            if worker is None:
                worker = self._provision(job, plan)
            self._stream(job, worker)
        except RbeeError as e:
            self._on_error(job, worker, e)
        except Exception as e:  # a bug must fail the job, never hang it
            log.exception("job %s failed", job.id)
            self._on_error(job, worker, RbeeError(f"internal error: {type(e).__name__}: {e}"))
        finally:
            with self.cond:
                self.reservations.pop(job.id, None)
                if worker is not None and (worker.host, worker.id) in self.workers:
                    worker.state = "idle"
                    worker.last_used = time.time()
                    self.store.save_worker(worker.host, worker.id, worker.to_dict(secret=True))
                self.cond.notify_all()

    def _placed_event(self, job: LiveJob, plan: Plan,
                      worker: ManagedWorker | None) -> tuple[int, str, dict[str, Any]]:
        if worker is not None:
            data = {"host": worker.host, "backend": worker.backend, "device": worker.devices[0],
                    "devices": list(worker.devices), "reason": plan.reason,
                    "worker": worker.id, "rejected": [], "path": "warm"}
        else:
            assert plan.placement is not None
            p = plan.placement.to_dict()
            data = {**p["chosen"], "reason": plan.reason, "rejected": p["rejected"],
                    "ctx": p["ctx"], "estimate": p["estimate"], "path": "cold",
                    "evict": [v.id for v in plan.victims]}
        return job.next_event(E.placed, data)

    def _provision(self, job: LiveJob, plan: Plan) -> ManagedWorker:
        assert plan.placement is not None
        placement = plan.placement
        chosen = placement.chosen
        config = self.load_hosts()[chosen.host]
        hive = self.session.hive(config)
        for victim in plan.victims:
            self._evict(job, victim, hive)
        if chosen.worker is not None:  # an idle worker the queen did not start
            token = hive.token(chosen.worker["id"])
            return self._manage(chosen.host, chosen.worker, token,
                                config.worker_url(chosen.worker["port"]), job)
        spec = model_spec(job.request.model)
        t0 = time.perf_counter()
        if not chosen.has_model:
            job.cancel.check(job.id)
            hive_report = self._download_reporter(job)
            provision.ensure_model(hive, str(spec.source), spec.id, spec.sha256, hive_report)
            job.timings["download_ms"] = (time.perf_counter() - t0) * 1000
        job.cancel.check(job.id)
        job.next_event(E.loading, {"host": chosen.host, "backend": chosen.backend,
                                   "devices": list(chosen.devices)})
        t1 = time.perf_counter()
        split = chosen.tensor_split if len(chosen.devices) > 1 else None
        record, token = provision.spawn_worker(
            hive, SpawnRequest(chosen.backend, spec.id, chosen.devices, ctx=placement.ctx,
                               tensor_split=split))
        job.timings["spawn_ms"] = (time.perf_counter() - t1) * 1000
        with self.cond:
            self.failures.pop(job.model_id, None)
        worker = self._manage(chosen.host, record, token, config.worker_url(record["port"]), job)
        self.refresh_hosts(names=[chosen.host])
        return worker

    def _manage(self, host: str, record: dict[str, Any], token: str, url: str,
                job: LiveJob) -> ManagedWorker:
        from rbee_common.fit import worker_devices

        w = ManagedWorker(host=host, id=record["id"], url=url, token=token,
                          model=job.model_id, backend=record["backend"],
                          devices=tuple(worker_devices(record)), ctx=int(record["ctx"]),
                          state="busy", estimate_bytes=int(record.get("estimate_bytes") or 0))
        with self.cond:
            self.workers[(host, w.id)] = w
            self.reservations.pop(job.id, None)
        self.store.save_worker(host, w.id, w.to_dict(secret=True))
        return w

    def _evict(self, job: LiveJob, victim: lifecycle.Idle, hive: Any) -> None:
        job.next_event(E.evicting, {"host": victim.host, "worker": victim.id,
                                    "model": victim.model,
                                    "idle_s": round(time.time() - victim.last_used, 1),
                                    "reason": "least recently used idle worker; the job needs "
                                              "its memory"})
        self._forget(victim.host, victim.id)
        with contextlib.suppress(RbeeError):
            hive.stop(victim.id)
        self.metrics.evictions += 1

    def _download_reporter(self, job: LiveJob) -> Callable[[dict[str, Any]], None]:
        state = {"total": None, "last": 0.0}

        def report(event: dict[str, Any]) -> None:
            if event.get("phase") != "download":
                return
            if event.get("total") is not None:
                state["total"] = event["total"]
            now = time.monotonic()
            done = event.get("event") == "done"
            if event.get("event") == "progress" and now - float(state["last"] or 0) < 0.2:
                return
            state["last"] = now
            job.next_event(E.downloading, {"bytes": event.get("completed"),
                                           "total": state["total"], "done": done})

        return report

    def _stream(self, job: LiveJob, worker: ManagedWorker) -> None:
        body = job.request.body(job.id)
        deadline = time.monotonic() + self.settings.busy_wait
        job.worker = worker.id

        def opened() -> None:  # the worker took the job: it runs from here on
            started = job.next_event(E.started, {"worker": worker.id, "host": worker.host,
                                                 "model": worker.model, "url": worker.url})
            self._transition(job, JobState.running, [started], worker=worker.id,
                             host=worker.host)
            job.started_at = time.perf_counter()

        def on_text(t: str) -> None:
            if job.first_token_at is None:
                job.first_token_at = time.perf_counter()
            job.text.append(t)
            job.tokens += 1
            job.next_event(E.token, {"t": t, "i": job.tokens - 1})
            if time.monotonic() - job.saved_at >= SAVE_PROGRESS_S:
                self._save_progress(job)

        with job.cancel.hook(lambda: cancel(worker.url, worker.token, job.id)):
            while True:
                job.cancel.check(job.id)
                try:
                    stream = execute(worker.url, worker.token, body, on_text, on_open=opened)
                    break
                except Busy as e:  # someone outside the queen uses this worker
                    if time.monotonic() + e.retry_after > deadline:
                        raise
                    time.sleep(e.retry_after)
        end = dict(stream.end or {})
        job.timings.update({"ttft_ms": round(stream.ttft_ms or 0.0, 2),
                            "stream_ms": round(stream.total_ms, 2),
                            "worker_ttft_ms": end.get("ttft_ms"),
                            "tokens_per_sec": end.get("tokens_per_sec")})
        with self.cond:
            worker.requests += 1
            worker.tokens += job.tokens
            worker.last_tokens_per_sec = float(end.get("tokens_per_sec") or 0.0)
            self.metrics.tokens += job.tokens
            if stream.ttft_ms:
                self.metrics.ttft_sum_s += stream.ttft_ms / 1000
                self.metrics.ttft_count += 1
            self.metrics.last_tokens_per_sec = worker.last_tokens_per_sec
        cancelled = end.get("stop_reason") == StopReason.CANCELLED
        self._finish(job, JobState.cancelled if cancelled else JobState.done, E.end, end)

    def _unsaved_tokens(self, job: LiveJob) -> list[tuple[int, str, dict[str, Any]]]:
        return [e for e in job.events if e[1] == E.token.value and e[0] > job.saved_seq]

    def _save_progress(self, job: LiveJob) -> None:
        """Write the tokens streamed since the last save (once a second, on the streaming
        thread: the same one that writes the job's end, so the two never cross)."""
        events = self._unsaved_tokens(job)
        job.saved_at = time.monotonic()
        if not events:
            return
        try:
            self.store.save_progress(job.id, events, "".join(job.text), job.tokens)
        except Exception as e:  # the job goes on; its end writes what this could not
            log.warning("could not save job %s's progress: %s", job.id, e)
            return
        job.saved_seq = events[-1][0]

    def _cancelled_end(self) -> dict[str, Any]:
        return {"tokens_out": 0, "stop_reason": StopReason.CANCELLED.value}

    def _on_error(self, job: LiveJob, worker: ManagedWorker | None, e: RbeeError) -> None:
        if e.code == "CANCELLED":
            self._finish(job, JobState.cancelled, E.end,
                         {**self._cancelled_end(), "tokens_out": job.tokens})
            return
        crashed = isinstance(e, WorkerCrashed) or e.code == "WORKER_CRASHED"
        stale = e.code in ("INSUFFICIENT_RAM", "INSUFFICIENT_VRAM", "NO_FREE_PORT")
        if stale and job.state is JobState.placed and job.worker is None and job.attempts < 3:
            # the host refused what its picture here promised: look again, then place again
            job.attempts += 1
            if job.host:
                self.refresh_hosts(names=[job.host])
            self._requeue(job)
            return
        gone = crashed or e.code == "WORKER_NOT_FOUND"
        if gone and job.state is JobState.placed and job.worker is None and job.tokens == 0:
            # the worker it was given died (or was stopped) before it took this job: forget
            # it and place the job again
            if worker is not None:
                self._forget(worker.host, worker.id)
            adopted = (job.placement or {}).get("worker")
            if adopted and job.host:
                self._forget(job.host, adopted)
            self._requeue(job)
            return
        if crashed:
            if worker is not None:
                self._forget(worker.host, worker.id)
                e.details.setdefault("hint_worker", worker.id)
                e.hint = (f"Read its log: rbee pool worker logs {worker.id} --host "
                          f"{worker.host}. The next job starts a new worker.")
            self._note_failure(job.model_id, e)
        elif job.state is JobState.placed and job.worker is None:
            self._note_failure(job.model_id, e)  # it never started
        self._fail(job, e)

    def _note_failure(self, model: str, e: RbeeError) -> None:
        with self.cond:
            f = self.failures.setdefault(model, Failures())
            f.count += 1
            f.last = time.time()
            f.error = {"code": e.code, "message": e.message}

    def _requeue(self, job: LiveJob) -> None:
        with self.cond:
            job.worker = None
            self._transition(job, JobState.queued, [job.next_event(E.queued, {
                "position": 1})], worker=None)
            self.queue.insert(0, job)  # it was first in line already
            self.cond.notify_all()

    def _fail(self, job: LiveJob, e: RbeeError) -> None:
        job.error = e.to_dict()
        self._finish(job, JobState.failed, E.error, e.to_dict())

    def _transition(self, job: LiveJob, new: JobState,
                    events: list[tuple[int, str, dict[str, Any]]], **fields: Any) -> None:
        self.store.transition(job.id, job.state, new, events=events, **fields)
        job.state = new

    def _finish(self, job: LiveJob, state: JobState, name: JobEventName,
                data: dict[str, Any]) -> None:
        """The last transition: the job's token events not saved yet (they are saved by the
        second while it streams), its text and figures, and its final event, in one
        transaction."""
        event = job.next_event(name, data)
        tokens = self._unsaved_tokens(job)
        timings = {k: v for k, v in job.timings.items() if v is not None}
        self.store.transition(job.id, job.state, state, events=[*tokens, event],
                              text="".join(job.text), tokens=job.tokens, timings=timings,
                              error=job.error)
        job.state = state
        self._count(state.value)

    def _count(self, outcome: str) -> None:
        self.metrics.jobs[outcome] = self.metrics.jobs.get(outcome, 0) + 1

    # housekeeping threads

    def _poll_loop(self) -> None:
        """Every host whose picture is older than the poll interval (and that no heartbeat
        keeps fresh) is asked again, in its own thread, one question at a time per host."""
        while not self.stopping.wait(min(0.25, self.settings.poll_interval / 4)):
            try:
                configs = self.load_hosts()
                now = time.time()
                with self.cond:
                    for gone in set(self.hosts) - set(configs):
                        del self.hosts[gone]
                    due = [c for n, c in configs.items() if n not in self.polling and
                           now - max(self.hosts.get(n, HostView(n)).checked,
                                     self.hosts.get(n, HostView(n)).seen)
                           >= self.settings.poll_interval]
                    self.polling.update(c.name for c in due)
                for config in due:
                    threading.Thread(target=self._poll_one, args=(config,), daemon=True,
                                     name=f"poll-{config.name}").start()
            except Exception:  # keep polling whatever one round did
                log.exception("polling hosts failed")

    def _reap_loop(self) -> None:
        while not self.stopping.wait(1.0):
            self.prune()
            now = time.time()
            with self.cond:
                idle = [lifecycle.Idle(w.id, w.host, w.model, w.backend, w.devices, w.last_used)
                        for w in self.workers.values() if w.state == "idle"]
                due = lifecycle.expired(idle, self.ttl_of, now)
                for d in due:
                    self._forget(d.host, d.id)
            for d in due:
                self._stop_quietly(d.host, d.id)
                self.metrics.ttl_stops += 1
                log.info("stopped %s on %s: idle longer than its TTL", d.id, d.host)

    def _stop_quietly(self, host: str, worker_id: str) -> None:
        config = self.load_hosts().get(host)
        if config is not None:
            with contextlib.suppress(RbeeError):
                self.session.hive(config).stop(worker_id)

    def stop_worker(self, host: str, worker_id: str) -> dict[str, Any]:
        """Stop a worker (the UI's stop button); refused while it runs a job."""
        with self.cond:
            w = self.workers.get((host, worker_id))
            if w is not None and w.state != "idle":
                raise WorkerBusy(f"worker {worker_id} is running a job",
                                 hint="Cancel the job first, or wait for it to end.")
            self._forget(host, worker_id)
        config = self.load_hosts()[host]
        doc = self.session.hive(config).stop(worker_id)
        self.refresh_hosts(names=[host])
        return doc

    def _sample_loop(self) -> None:
        while not self.stopping.wait(self.settings.sample_interval):
            with contextlib.suppress(Exception):
                self.store.add_sample(time.time(), self.sample())

    def sample(self) -> dict[str, Any]:
        """One point of the charts: queue depth, tokens/s now, memory per device."""
        with self.cond:
            busy = [w for w in self.workers.values() if w.state == "busy"]
            memory = {}
            for name, view in self.hosts.items():
                for d in (view.status or {}).get("devices", []):
                    memory[f"{name} {d['backend']}:{d['index']}"] = {
                        "free": d.get("memory_free"), "total": d.get("memory_total")}
            return {"queue": len(self.queue), "running": len(busy),
                    "tokens_per_sec": round(sum(w.last_tokens_per_sec for w in busy), 2),
                    "memory": memory}

    # documents

    def models_doc(self) -> dict[str, Any]:
        """The catalog plus every model some host has, with where each is on disk and loaded."""
        from rbee_common.catalog import load_catalog

        catalog = load_catalog()
        ttls = self.store.ttls()
        out: dict[str, dict[str, Any]] = {
            e.id: {"id": e.id, "name": e.name, "source": e.source, "size": e.size,
                   "in_catalog": True, "hosts": [], "loaded": [],
                   "ttl": ttls.get(e.id, e.ttl), "default_ttl": self.settings.ttl}
            for e in catalog.values()}
        with self.cond:
            for name, view in sorted(self.hosts.items()):
                status = view.status or {}
                for m in status.get("models", []):
                    doc = out.setdefault(m["id"], {
                        "id": m["id"], "name": m.get("name") or m["id"], "source": m["source"],
                        "size": m.get("size"), "in_catalog": False, "hosts": [], "loaded": [],
                        "ttl": ttls.get(m["id"]), "default_ttl": self.settings.ttl})
                    doc["hosts"].append(name)
                for w in status.get("workers", []):
                    if w.get("model") in out and w.get("state") in (
                            WorkerState.ready, WorkerState.busy, WorkerState.loading):
                        out[w["model"]]["loaded"].append({
                            "host": name, "worker": w["id"], "state": w["state"],
                            "backend": w["backend"], "device": w["device"]})
        return {"schema": "rbee.queen.models/v1", "models": sorted(out.values(),
                                                                   key=lambda m: m["id"])}

    def metrics_text(self) -> str:
        """Prometheus text: queue, jobs by outcome, TTFT, tokens/s, workers, evictions,
        heartbeat age per host."""
        now = time.time()
        m = self.metrics
        with self.cond:
            by_state: dict[str, int] = {}
            for w in self.workers.values():
                by_state[w.state] = by_state.get(w.state, 0) + 1
            lines = [
                "# HELP rbee_queen_queue_depth Jobs waiting in the queue.",
                "# TYPE rbee_queen_queue_depth gauge",
                f"rbee_queen_queue_depth {len(self.queue)}",
                "# HELP rbee_queen_jobs_total Jobs by outcome.",
                "# TYPE rbee_queen_jobs_total counter",
                *(f'rbee_queen_jobs_total{{outcome="{k}"}} {v}' for k, v in sorted(m.jobs.items())),
                "# HELP rbee_queen_time_to_first_token_seconds Time to first token, as the queen "
                "sees it.",
                "# TYPE rbee_queen_time_to_first_token_seconds summary",
                f"rbee_queen_time_to_first_token_seconds_sum {m.ttft_sum_s:.6f}",
                f"rbee_queen_time_to_first_token_seconds_count {m.ttft_count}",
                "# HELP rbee_queen_tokens_generated_total Tokens streamed to clients.",
                "# TYPE rbee_queen_tokens_generated_total counter",
                f"rbee_queen_tokens_generated_total {m.tokens}",
                "# HELP rbee_queen_decode_tokens_per_second Decode rate of the last job.",
                "# TYPE rbee_queen_decode_tokens_per_second gauge",
                f"rbee_queen_decode_tokens_per_second {m.last_tokens_per_sec:.3f}",
                "# HELP rbee_queen_workers Workers the queen manages, by state.",
                "# TYPE rbee_queen_workers gauge",
                *(f'rbee_queen_workers{{state="{s}"}} {by_state.get(s, 0)}'
                  for s in ("starting", "idle", "busy")),
                "# HELP rbee_queen_evictions_total Idle workers stopped to make room for a job.",
                "# TYPE rbee_queen_evictions_total counter",
                f"rbee_queen_evictions_total {m.evictions}",
                "# HELP rbee_queen_ttl_stops_total Idle workers stopped after their TTL.",
                "# TYPE rbee_queen_ttl_stops_total counter",
                f"rbee_queen_ttl_stops_total {m.ttl_stops}",
                "# HELP rbee_queen_host_heartbeat_age_seconds Seconds since a host's last status.",
                "# TYPE rbee_queen_host_heartbeat_age_seconds gauge",
                *(f'rbee_queen_host_heartbeat_age_seconds{{host="{n}"}} '
                  f'{(now - v.seen) if v.seen else -1:.1f}'
                  for n, v in sorted(self.hosts.items())),
                "# HELP rbee_queen_host_up 1 if the host answered its last status.",
                "# TYPE rbee_queen_host_up gauge",
                *(f'rbee_queen_host_up{{host="{n}"}} {0 if v.error else 1}'
                  for n, v in sorted(self.hosts.items())),
            ]
        return "\n".join(lines) + "\n"

    def prune(self, keep_s: float = 60.0) -> None:
        """Forget finished jobs' in-memory copies after a while (their store rows stay)."""
        now = time.time()
        with self.cond:
            for job_id, job in list(self.jobs.items()):
                if job.final and now - job.created > keep_s and not job.has_listeners():
                    del self.jobs[job_id]

    def state_doc(self) -> dict[str, Any]:
        now = time.time()
        with self.cond:
            return {
                "schema": "rbee.queen.state/v1",
                "uptime_s": round(now - self.started, 1),
                "hosts": [self.hosts[n].to_dict(now) for n in sorted(self.hosts)],
                "workers": [w.to_dict() for w in self.workers.values()],
                "queue": [{"id": j.id, "model": j.request.model, "position": i + 1,
                           "waiting_s": round(now - j.created, 1)}
                          for i, j in enumerate(self.queue)],
                "running": [j.summary() for j in self.jobs.values()
                            if j.state in (JobState.placed, JobState.running)],
                "failures": {m: {"count": f.count, "error": f.error}
                             for m, f in self.failures.items()},
            }

    # --- for the web UI (rbee_keeper.queen.admin): workers started by hand -----------------

    def placement_view(self) -> dict[str, dict[str, Any] | RbeeError]:
        """The host pictures placement works on (workers being started counted in)."""
        with self.cond:
            return self._statuses()

    def hold(self, key: str, reservation: dict[str, Any]) -> None:
        """Count the memory of a worker being started outside a job until `release`."""
        with self.cond:
            self.reservations[key] = reservation

    def release(self, key: str) -> None:
        with self.cond:
            self.reservations.pop(key, None)
            self.cond.notify_all()

    def manage_started(self, host: str, record: dict[str, Any], token: str, url: str,
                       model_id: str) -> dict[str, Any]:
        """A worker started by hand: jobs are scheduled onto it and its idle TTL applies, as
        for the workers the queen starts itself."""
        from rbee_common.fit import worker_devices

        w = ManagedWorker(host=host, id=record["id"], url=url, token=token, model=model_id,
                          backend=record["backend"], devices=tuple(worker_devices(record)),
                          ctx=int(record["ctx"]), state="idle",
                          estimate_bytes=int(record.get("estimate_bytes") or 0))
        with self.cond:
            self.workers[(host, w.id)] = w
            self.cond.notify_all()
        self.store.save_worker(host, w.id, w.to_dict(secret=True))
        return w.to_dict()


def model_spec(ref: str) -> ModelSpec:
    """A job's model reference resolved as `rbee infer` resolves it (catalog, hf:, https:,
    file:, or an id some host registered)."""
    from rbee_keeper.infer import _spec

    return _spec(ref)


def _without_devices(statuses: dict[str, dict[str, Any] | RbeeError],
                     taken: set[tuple[str, str, int]]) -> dict[str, dict[str, Any] | RbeeError]:
    """Host statuses with some devices left out (placement then looks elsewhere)."""
    out: dict[str, dict[str, Any] | RbeeError] = {}
    for name, status in statuses.items():
        if isinstance(status, dict):
            status = {**status, "devices": [d for d in status.get("devices", [])
                                            if (name, d["backend"], d["index"]) not in taken]}
        out[name] = status
    return out
