"""The pool as a whole: every host's status, their workers, a preflight of each host,
finding and stopping a worker, and any hive command on one host.

Each function returns the document a CLI prints (and the queen will serve); hosts are asked
in parallel and each reports its own result (fabric's GroupResult), so one host that is
down never stops the others. `status` in a document is ok | partial | error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rbee_common.errors import RbeeError, WorkerNotFound
from rbee_common.progress import Reporter, null_reporter
from rbee_keeper import cache, daemons, provision
from rbee_keeper.fanout import HostOutcome, fan_out, overall
from rbee_keeper.hive import Session
from rbee_keeper.hosts import HostConfig

Doc = dict[str, Any]
Hosts = dict[str, HostConfig]

DEFAULT_TIMEOUT = 20.0
POOL_STATUS = "rbee.pool.status/v1"
WORKERS = "rbee.workers/v1"
CHECK = "rbee.hosts.check/v1"
STOPPED = "rbee.workers.stopped/v1"

# The order a connection gets through: the first failing step explains everything after it.
CHECK_STEPS = ("reachable", "host_key", "auth", "hive", "schema")
SSH_ONLY_STEPS = frozenset({"host_key", "auth"})
FAILED_AT = {"HOST_UNREACHABLE": "reachable", "HOST_KEY_UNKNOWN": "host_key",
             "HOST_KEY_MISMATCH": "host_key", "SSH_AUTH_FAILED": "auth",
             "HIVE_NOT_INSTALLED": "hive", "SCHEMA_MISMATCH": "schema"}


def statuses(hosts: Hosts, session: Session,
             timeout: float = DEFAULT_TIMEOUT) -> list[HostOutcome[Doc]]:
    """`rbee-hive status` of every host at once: the one fan-out every pool view starts from."""
    return fan_out(hosts, lambda n: session.hive(hosts[n]).status(timeout=timeout), timeout)


def pool_status(hosts: Hosts, session: Session, timeout: float = DEFAULT_TIMEOUT) -> Doc:
    """The `rbee.pool.status/v1` document: every host's status or its error."""
    outcomes = statuses(hosts, session, timeout)
    return {"schema": POOL_STATUS, "status": overall(outcomes)[0],
            "hosts": [o.to_dict("status") for o in outcomes]}


def _checks(host: HostConfig, error: RbeeError | None) -> list[Doc]:
    failed = FAILED_AT.get(error.code, "hive") if error else None
    out: list[Doc] = []
    seen_failure = False
    for step in CHECK_STEPS:
        if host.transport == "local" and step in SSH_ONLY_STEPS:
            out.append({"check": step, "ok": None, "skipped": "a local host needs no SSH"})
        elif seen_failure:
            out.append({"check": step, "ok": None, "skipped": "an earlier check failed"})
        elif step == failed:
            out.append({"check": step, "ok": False, "skipped": None})
            seen_failure = True
        else:
            out.append({"check": step, "ok": True, "skipped": None})
    return out


def check_hosts(hosts: Hosts, session: Session, timeout: float = DEFAULT_TIMEOUT) -> Doc:
    """Preflight: reachable, host key known, login, rbee-hive found, same schema."""
    outcomes = statuses(hosts, session, timeout)
    docs = []
    for o in outcomes:
        d = o.to_dict("status")
        d["checks"] = _checks(hosts[o.name], o.error)
        docs.append(d)
    return {"schema": CHECK, "status": overall(outcomes)[0], "hosts": docs}


def _workers(hosts: Hosts, session: Session,
             timeout: float) -> tuple[list[HostOutcome[list[Doc]]], list[Doc]]:
    outcomes = fan_out(hosts, lambda n: session.hive(hosts[n]).workers(timeout=timeout), timeout)
    flat = [{**w, "host": o.name, "url": hosts[o.name].worker_url(w["port"])}
            for o in outcomes for w in o.value or []]
    return outcomes, flat


def list_workers(hosts: Hosts, session: Session, timeout: float = DEFAULT_TIMEOUT) -> Doc:
    """The `rbee.workers/v1` document: every worker of every host, with its host's result."""
    outcomes, flat = _workers(hosts, session, timeout)
    return {"schema": WORKERS, "status": overall(outcomes)[0],
            "hosts": [o.to_dict("workers") for o in outcomes], "workers": flat}


def locate_worker(worker_id: str, hosts: Hosts, session: Session,
                  timeout: float = DEFAULT_TIMEOUT) -> str:
    """The host a worker runs on: from what this controller remembers, else by asking all."""
    for known in cache.load():
        if known.id == worker_id and known.host in hosts:
            return known.host
    _, flat = _workers(hosts, session, timeout)
    for w in flat:
        if w["id"] == worker_id:
            return str(w["host"])
    raise WorkerNotFound(f"no host has a worker {worker_id!r}")


def stop_worker(worker_id: str, host: HostConfig, session: Session) -> Doc:
    """Stop one worker on its host and forget it; the hive's `stopped` document + host."""
    doc = session.hive(host).stop(worker_id)
    cache.forget(worker_id, host.name)
    return {**doc, "host": host.name}


def stop_all_workers(hosts: Hosts, session: Session, timeout: float = DEFAULT_TIMEOUT) -> Doc:
    """Stop every worker of every host (in parallel); each host reports its own result."""
    def one(name: str) -> list[Doc]:
        stopped = list(session.hive(hosts[name]).stop_all(timeout=timeout)["stopped"])
        for s in stopped:
            cache.forget(s["id"], name)
        return stopped

    outcomes = fan_out(hosts, one, timeout)
    return {"schema": STOPPED, "status": overall(outcomes)[0],
            "hosts": [o.to_dict("stopped") for o in outcomes],
            "stopped": [{**s, "host": o.name} for o in outcomes for s in o.value or []]}


def run_on_host(host: HostConfig, args: Sequence[str], session: Session,
                report: Reporter = null_reporter, bind: str | None = None) -> Doc:
    """Any rbee-hive command on one host (`rbee pool … --host NAME`).

    A spawned worker gets its token from here and is remembered, a stopped one forgotten,
    exactly as when `rbee infer` starts or stops one; a pool daemon started here is
    remembered (its URL and token) and used from then on, a stopped one forgotten.
    """
    args = list(args)
    hive = session.hive(host)
    if args[:2] == ["daemon", "start"]:
        return daemons.start_on_host(host, args, hive, report)
    if args[:2] == ["daemon", "stop"]:
        return daemons.stop_on_host(host, args, hive, report)
    if args[:2] == ["worker", "spawn"]:
        token = provision.new_token()
        args.append("--token-stdin")
        if "--bind" not in args:
            args += ["--bind", bind or host.worker_bind()]
        doc = hive.command(args, on_event=report, secrets={"token": token})
        provision.remember(host, doc, token)
        return doc
    doc = hive.command(args, on_event=report)
    if args[:2] == ["worker", "stop"]:
        for stopped in doc.get("stopped", [doc]):
            cache.forget(stopped["id"], host.name)
    return doc


def stream_on_host(host: HostConfig, args: Sequence[str], session: Session,
                   on_line: Callable[[str], None]) -> int:
    """A hive command whose output is lines (`--help`, `worker logs --follow`) on one host."""
    return session.hive(host).lines(args, on_line)
