"""Running the pool daemon in this process: `rbee-hive daemon start --foreground` (systemd),
and the detached start, which runs `python -m rbee_hive.daemon`."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

from rbee_common.daemon import (
    DaemonAlreadyRunning,
    listen,
    local_url,
    running,
    serve_app,
    token,
    url_of,
)
from rbee_common.errors import RbeeError
from rbee_hive.daemon import DEFAULT_BIND, DEFAULT_PORT, daemon_files
from rbee_hive.daemon.watch import HEARTBEAT_INTERVAL, WATCH_INTERVAL

log = logging.getLogger("rbee.hive.daemon")


@dataclass(frozen=True)
class ServeOptions:
    port: int = DEFAULT_PORT
    bind: str = DEFAULT_BIND
    watch_interval: float = WATCH_INTERVAL
    heartbeat_interval: float = HEARTBEAT_INTERVAL


def serve(opts: ServeOptions) -> int:
    """Run the daemon until SIGTERM/SIGINT; it records itself in pool-daemon.json meanwhile.

    Workers it started keep running when it stops: they are the host's, not the daemon's.
    """
    from rbee_hive.daemon.app import create_app
    from rbee_hive.daemon.service import PoolService
    from rbee_hive.daemon.watch import QueenLink, QueenSettings, Watcher
    from rbee_hive.status import status

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    files = daemon_files()
    other = running(files)
    if other is not None:
        raise DaemonAlreadyRunning(f"a pool daemon already runs here (pid {other['pid']}, "
                                   f"{other.get('url')})",
                                   hint="Stop it with `rbee-hive daemon stop`.")
    secret = token(files, create=True)
    sock = listen(opts.bind, opts.port)
    url = url_of(opts.bind, opts.port)
    queen = QueenSettings.from_env()
    link = QueenLink(queen, opts.heartbeat_interval, url) if queen is not None else None
    watcher = Watcher(status, opts.watch_interval, link)
    service = PoolService(on_change=watcher.poke)

    def info() -> dict[str, Any]:
        return {"url": url, "rbee_home": str(files.dir),
                "watch": {"interval_s": watcher.interval, "last_tick_at": watcher.last_tick},
                "queen": link.summary() if link is not None else None}

    app = create_app(service, secret, info)
    if link is not None:
        link.start()
        log.info("heartbeats to the queen at %s as host %r every %gs", link.settings.url,
                 link.settings.host, opts.heartbeat_interval)
    watcher.start()
    log.info("pool daemon on %s (RBEE_HOME %s)", url, files.dir)

    def stop() -> None:
        watcher.stop()
        if link is not None:
            link.stop()
        log.info("pool daemon stopped")

    serve_app(app, sock, files, stop, lifespan="on", url=url, port=opts.port, bind=opts.bind,
              local_url=local_url(opts.bind, opts.port),
              queen_url=queen.url if queen is not None else None)
    return 0


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m rbee_hive.daemon",
                                description="Run the pool daemon (use `rbee-hive daemon start`).")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--bind", default=DEFAULT_BIND)
    p.add_argument("--watch-interval", type=float, default=WATCH_INTERVAL)
    p.add_argument("--heartbeat-interval", type=float, default=HEARTBEAT_INTERVAL)
    a = p.parse_args(argv)
    try:
        code = serve(ServeOptions(a.port, a.bind, a.watch_interval, a.heartbeat_interval))
    except RbeeError as e:
        sys.stderr.write(f"Error: {e.message} ({e.code})\n")
        code = 1
    sys.exit(code)
