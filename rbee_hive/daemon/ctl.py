"""Starting, stopping and asking after this host's pool daemon (`rbee-hive daemon …`).

Every answer is one `rbee.hive.daemon/v1` document with the same keys, running or not.
"""

from __future__ import annotations

from typing import Any

from rbee_common import daemon
from rbee_common.errors import UsageError
from rbee_hive import schemas
from rbee_hive.daemon import daemon_files
from rbee_hive.daemon.serve import ServeOptions

Doc = dict[str, Any]

START_TIMEOUT = 30.0


def options(*, port: int, bind: str, heartbeat_interval: float) -> ServeOptions:
    """Checked options; USAGE for a port or interval that cannot work."""
    if not 1 <= port <= 65535:
        raise UsageError(f"--port {port}: choose 1–65535")
    if not bind:
        raise UsageError("--bind needs an address (127.0.0.1, 0.0.0.0, or this host's IP)")
    if heartbeat_interval <= 0:
        raise UsageError("--heartbeat-interval must be above 0")
    return ServeOptions(port=port, bind=bind, heartbeat_interval=heartbeat_interval)


def _doc(state: dict[str, Any] | None, **extra: Any) -> Doc:
    state = state or {}
    return {"schema": schemas.DAEMON, "running": False,
            **{k: state.get(k) for k in ("pid", "url", "port", "bind", "started_at",
                                          "queen_url")},
            "log": str(daemon_files().log_path), "health": None, "signal": None, **extra}


def run_foreground(opts: ServeOptions) -> int:
    """Serve in this process until stopped (for systemd)."""
    from rbee_hive.daemon.serve import serve

    return serve(opts)


def start(opts: ServeOptions) -> Doc:
    """Start the daemon detached; return once GET /health answers."""
    argv = daemon.own_argv("rbee_hive.daemon", "--port", str(opts.port), "--bind", opts.bind,
                           "--watch-interval", str(opts.watch_interval),
                           "--heartbeat-interval", str(opts.heartbeat_interval))
    state = daemon.start_detached(argv, daemon_files(), daemon.local_url(opts.bind, opts.port),
                                  timeout=START_TIMEOUT)
    return _doc(state, running=True)


def stop() -> Doc:
    """Stop the daemon (its workers keep running); DAEMON_NOT_RUNNING when none runs."""
    state = daemon.stop(daemon_files())
    return _doc(state, signal=state.get("signal"))


def status() -> Doc:
    """Whether it runs, where, and what it says about itself (its watcher, its queen link)."""
    files = daemon_files()
    state = daemon.running(files)
    if state is None:
        return _doc(None)
    health = None
    try:
        from rbee_common.api import ApiClient

        health = ApiClient(str(state["local_url"]), daemon.token(files),
                           timeout=5.0).json("GET", "/v2/daemon")
    except Exception:  # it runs but does not answer: say so, with what the state file knows
        health = None
    return _doc(state, running=True, health=health)


def token_doc() -> Doc:
    """Its bearer token (made on first start, kept in $RBEE_HOME with mode 0600)."""
    return {"schema": schemas.DAEMON_TOKEN, "token": daemon.token(daemon_files())}
