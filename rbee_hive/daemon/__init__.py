"""The pool daemon (M1, DESIGN.md §7): this host's hive as an HTTP service.

    serve.py    run it (uvicorn on a socket made first; state file while it runs)
    app.py      the routes: parse, call the service, shape the answer
    service.py  the core functions behind the routes, mutations serialized
    watch.py    notices dead workers within seconds; heartbeats to the queen
    logs.py     following a worker's log without holding a thread
    client.py   the hive CLI's way in while a daemon runs (standard library only)
    ctl.py      `rbee-hive daemon start|stop|status|token`

Its files live in $RBEE_HOME beside the registry it guards: pool-daemon.token (0600),
pool-daemon.json (pid, url; 0600) and pool-daemon.log.
"""

from __future__ import annotations

from rbee_common.daemon import DaemonFiles
from rbee_common.paths import rbee_home

DEFAULT_PORT = 9200
DEFAULT_BIND = "127.0.0.1"
NAME = "pool-daemon"


def daemon_files() -> DaemonFiles:
    """Token, state and log of this host's pool daemon (in $RBEE_HOME, read at call time)."""
    return DaemonFiles(rbee_home(), NAME)
