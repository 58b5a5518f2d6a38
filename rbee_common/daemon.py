"""What both rbee daemons (the pool daemon and the queen) share: a bearer token made on first
start (mode 0600), a pid/state file and a log file in their directory, a detached start that
returns once GET /health answers, and a stop that waits for the process to go.

    <dir>/<name>.token   the bearer token (0600)
    <dir>/<name>.json    pid, url, port, bind, started_at of the running daemon (0600)
    <dir>/<name>.log     its stdout and stderr

Nothing here knows what the daemon serves; its HTTP app and its CLI are its own.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rbee_common.errors import RbeeError
from rbee_common.files import atomic_write_bytes, atomic_write_json, read_json

TOKEN_BYTES = 32


class DaemonNotRunning(RbeeError):
    """The daemon is not running (no pid file, or its process is gone)."""

    code = "DAEMON_NOT_RUNNING"


class DaemonAlreadyRunning(RbeeError):
    """A daemon of this kind already runs here."""

    code = "DAEMON_ALREADY_RUNNING"


class DaemonStartFailed(RbeeError):
    """The daemon exited, or did not answer /health, while starting."""

    code = "DAEMON_START_FAILED"


@dataclass(frozen=True)
class DaemonFiles:
    dir: Path
    name: str

    @property
    def token_path(self) -> Path:
        return self.dir / f"{self.name}.token"

    @property
    def state_path(self) -> Path:
        return self.dir / f"{self.name}.json"

    @property
    def log_path(self) -> Path:
        return self.dir / f"{self.name}.log"


def token(files: DaemonFiles, create: bool = False) -> str:
    """The daemon's bearer token; made (mode 0600) on first start when `create`."""
    try:
        value = files.token_path.read_text().strip()
        if len(value) >= 16:
            return value
    except FileNotFoundError:
        pass
    if not create:
        raise DaemonNotRunning(f"no token at {files.token_path}: the {files.name} has never "
                               "been started here",
                               hint="Start it once; it makes its token on first start.")
    value = secrets.token_urlsafe(TOKEN_BYTES)
    atomic_write_bytes(files.token_path, (value + "\n").encode(), mode=0o600)
    return value


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no procfs (macOS): trust kill(0)


def running(files: DaemonFiles) -> dict[str, Any] | None:
    """The state of the running daemon, or None (a stale state file is removed)."""
    state = read_json(files.state_path)
    if not isinstance(state, dict) or not isinstance(state.get("pid"), int):
        return None
    if not pid_alive(state["pid"]):
        with contextlib.suppress(FileNotFoundError):
            files.state_path.unlink()
        return None
    return state


def write_state(files: DaemonFiles, **state: Any) -> dict[str, Any]:
    """Record this process as the running daemon (called by the daemon once it listens)."""
    doc = {"pid": os.getpid(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           **state}
    atomic_write_json(files.state_path, doc, mode=0o600)
    return doc


def clear_state(files: DaemonFiles) -> None:
    state = read_json(files.state_path)
    if isinstance(state, dict) and state.get("pid") == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            files.state_path.unlink()


def log_tail(path: Path, lines: int = 20) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - 32 * 1024, 0))
            return f.read().decode("utf-8", errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return []


def start_detached(argv: Sequence[str], files: DaemonFiles, health_url: str,
                   timeout: float = 30.0, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Start the daemon in its own session (its output to its log) and wait for /health."""
    from rbee_common.http import get_health

    state = running(files)
    if state is not None:
        raise DaemonAlreadyRunning(f"the {files.name} already runs (pid {state['pid']}, "
                                   f"{state.get('url')})", hint="Stop it first, or use it.",
                                   pid=state["pid"], url=state.get("url"))
    files.dir.mkdir(parents=True, exist_ok=True)
    with open(files.log_path, "ab") as log:
        os.chmod(files.log_path, 0o600)
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                close_fds=True, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise DaemonStartFailed(f"the {files.name} exited with status {code} while starting",
                                    hint=f"Read its log: {files.log_path}",
                                    log_tail=log_tail(files.log_path))
        health = get_health(health_url, timeout=0.5)
        state = running(files)
        if health is not None and state is not None:
            return state
        time.sleep(0.05)
    stop_pid(proc.pid, grace=3.0)
    raise DaemonStartFailed(f"the {files.name} did not answer {health_url} within {timeout:g}s; "
                            "stopped it", hint=f"Read its log: {files.log_path}",
                            log_tail=log_tail(files.log_path))


def stop_pid(pid: int, grace: float = 10.0) -> str | None:
    """SIGTERM, then SIGKILL after `grace` seconds; the signal that ended it (None: gone)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return None
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return sig.name
            time.sleep(0.05)
    return signal.SIGKILL.name


def stop(files: DaemonFiles, grace: float = 10.0) -> dict[str, Any]:
    """Stop the running daemon; DAEMON_NOT_RUNNING if there is none."""
    state = running(files)
    if state is None:
        raise DaemonNotRunning(f"the {files.name} is not running")
    used = stop_pid(int(state["pid"]), grace)
    with contextlib.suppress(FileNotFoundError):
        files.state_path.unlink()
    return {**state, "signal": used}


def url_of(bind: str, port: int) -> str:
    """Where others reach a daemon listening on `bind` (all addresses: this host's name)."""
    host = {"0.0.0.0": socket.gethostname(), "::": socket.gethostname()}.get(bind, bind)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def local_url(bind: str, port: int) -> str:
    """Where this machine reaches a daemon listening on `bind` (for health checks)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(bind, bind)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def listen(bind: str, port: int) -> socket.socket:
    """A listening socket, made before the server starts so a taken port fails the start."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((bind, port))
    except OSError as e:
        sock.close()
        raise DaemonStartFailed(f"cannot listen on {bind}:{port}: {e.strerror}",
                                hint="Choose another --port, or stop what uses it.") from e
    sock.listen(256)
    return sock


def own_argv(module: str, *args: str) -> list[str]:
    """This interpreter running `python -m module args`: the daemon runs the same install."""
    return [sys.executable, "-m", module, *args]


def serve_app(app: Any, sock: socket.socket, files: DaemonFiles,
              on_stop: Callable[[], None], lifespan: str = "off", **state: Any) -> None:
    """Serve `app` on `sock` until SIGTERM/SIGINT, recorded in the state file meanwhile;
    `on_stop` runs (then the state file goes) however the server ends."""
    import uvicorn

    from rbee_common.tcpserve import http_protocol

    # log_config=None: uvicorn logs through the handler the daemon set up (its log file)
    server = uvicorn.Server(uvicorn.Config(app, http=http_protocol(), ws="none",
                                           log_config=None, log_level="warning",
                                           access_log=False, lifespan=lifespan,
                                           timeout_graceful_shutdown=3))
    write_state(files, **state)
    # uvicorn shuts down gracefully on SIGTERM, then raises it again under the handler that
    # was there before it: make that one a no-op, so the cleanup below runs and we exit 0
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        try:
            on_stop()
        finally:
            clear_state(files)
