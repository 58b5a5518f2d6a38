"""Running the queen in this process: `rbee queen start --foreground` (and the detached
start, which runs `python -m rbee_keeper.queen`)."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

from rbee_common.daemon import (
    DaemonAlreadyRunning,
    DaemonFiles,
    listen,
    local_url,
    running,
    serve_app,
    token,
    url_of,
)
from rbee_common.errors import RbeeError
from rbee_common.paths import config_dir

DEFAULT_PORT = 8080
DEFAULT_BIND = "127.0.0.1"

log = logging.getLogger("rbee.queen")


def queen_files() -> DaemonFiles:
    return DaemonFiles(config_dir(), "queen")


def db_path() -> Any:
    return config_dir() / "queen.db"


@dataclass(frozen=True)
class ServeOptions:
    port: int = DEFAULT_PORT
    bind: str = DEFAULT_BIND
    queue_size: int = 64
    ttl: float = 300.0
    poll_interval: float = 2.0


def serve(opts: ServeOptions) -> int:
    """Run the queen until SIGTERM/SIGINT; it records itself in queen.json while it runs."""
    from rbee_keeper.hosts import load_hosts
    from rbee_keeper.queen.app import create_app
    from rbee_keeper.queen.runtime import Queen, QueenSettings
    from rbee_keeper.queen.store import Store

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    files = queen_files()
    other = running(files)
    if other is not None:
        raise DaemonAlreadyRunning(f"a queen already runs here (pid {other['pid']}, "
                                   f"{other.get('url')})", hint="Stop it with `rbee queen stop`.")
    secret = token(files, create=True)
    sock = listen(opts.bind, opts.port)
    store = Store(db_path())
    queen = Queen(QueenSettings(queue_size=opts.queue_size, ttl=opts.ttl,
                                poll_interval=opts.poll_interval), store, load_hosts)
    queen.start()
    app = create_app(queen, secret)
    log.info("queen on %s", url_of(opts.bind, opts.port))

    def stop() -> None:
        queen.stop()
        store.close()

    serve_app(app, sock, files, stop, url=url_of(opts.bind, opts.port), port=opts.port,
              bind=opts.bind, local_url=local_url(opts.bind, opts.port))
    return 0


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m rbee_keeper.queen",
                                description="Run the queen (use `rbee queen start`).")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--bind", default=DEFAULT_BIND)
    p.add_argument("--queue-size", type=int, default=64)
    p.add_argument("--ttl", type=float, default=300.0)
    p.add_argument("--poll-interval", type=float, default=2.0)
    a = p.parse_args(argv)
    try:
        code = serve(ServeOptions(a.port, a.bind, a.queue_size, a.ttl, a.poll_interval))
    except RbeeError as e:
        sys.stderr.write(f"Error: {e.message} ({e.code})\n")
        code = 1
    sys.exit(code)
