"""Starting, stopping and asking after the queen on this machine (`rbee queen …`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from rbee_common import daemon
from rbee_common.daemon import local_url
from rbee_common.http import get_health
from rbee_keeper.queen.serve import ServeOptions, queen_files

SCHEMA = "rbee.queen/v1"


def options(**kw: Any) -> ServeOptions:
    from rbee_common.errors import UsageError

    if not 1 <= kw["port"] <= 65535:
        raise UsageError(f"--port {kw['port']}: choose 1–65535")
    if kw["queue_size"] < 1:
        raise UsageError("--queue-size must be at least 1")
    if kw["ttl"] < 0 or kw["poll_interval"] <= 0:
        raise UsageError("--ttl must be ≥ 0 and --poll-interval > 0")
    return ServeOptions(**kw)


def run_foreground(opts: ServeOptions) -> int:
    from rbee_keeper.queen.serve import serve

    return serve(opts)


def start(opts: ServeOptions) -> dict[str, Any]:
    """Start the queen detached; return once GET /health answers."""
    argv = daemon.own_argv("rbee_keeper.queen", "--port", str(opts.port), "--bind", opts.bind,
                           "--queue-size", str(opts.queue_size), "--ttl", str(opts.ttl),
                           "--poll-interval", str(opts.poll_interval))
    state = daemon.start_detached(argv, queen_files(), local_url(opts.bind, opts.port),
                                  timeout=60.0)
    return {"schema": SCHEMA, "running": True, **_public(state),
            "log": str(queen_files().log_path)}


def _public(state: dict[str, Any]) -> dict[str, Any]:
    return {k: state.get(k) for k in ("pid", "url", "port", "bind", "started_at")}


def stop() -> dict[str, Any]:
    state = daemon.stop(queen_files())
    return {"schema": SCHEMA, "running": False, **_public(state), "signal": state.get("signal")}


def status() -> dict[str, Any]:
    """Running or not; with its health and a summary of its state when it runs."""
    files = queen_files()
    state = daemon.running(files)
    if state is None:
        return {"schema": SCHEMA, "running": False, "pid": None, "url": None, "port": None,
                "bind": None, "started_at": None, "health": None, "summary": None}
    health = get_health(str(state["local_url"]), timeout=2.0)
    summary = None
    if health is not None:
        from rbee_keeper.queen_client import QueenClient, QueenTarget

        try:
            st = QueenClient(QueenTarget(str(state["local_url"]),
                                         daemon.token(files))).state()
            summary = {"hosts": len(st["hosts"]),
                       "hosts_up": sum(1 for h in st["hosts"] if h["ok"]),
                       "workers": len(st["workers"]), "queued": len(st["queue"]),
                       "running": len(st["running"])}
        except Exception:  # the summary is a courtesy: the status stands without it
            summary = None
    return {"schema": SCHEMA, "running": True, **_public(state), "health": health,
            "summary": summary}


def token_doc() -> dict[str, Any]:
    return {"schema": "rbee.queen.token/v1", "token": daemon.token(queen_files())}


def log_lines(lines: int, follow: bool) -> Iterator[str]:
    """The queen's last log lines, then (with follow) new ones while it runs."""
    files = queen_files()
    from rbee_common.logfollow import follow as follow_file

    yield from follow_file(files.log_path, lines,
                           (lambda: daemon.running(files) is not None) if follow else None)
