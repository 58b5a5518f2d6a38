"""The pool daemon against SSH, over 1 and 8 loopback sshd hosts, in one run:

    state_ms              GET /v2/state of every host's daemon, in parallel (what the queen
                          and the keeper's HTTP client pay for a picture of the pool)
    pool_status_daemon_ms `rbee pool status` end to end, the hosts reached through daemons
    pool_status_ssh_ms    `rbee pool status` end to end over SSH (before any daemon ran)
    ssh_over_*            how many times longer the SSH way takes

    python bench/daemon.py [--hosts 1,8] [--runs 5]
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from _common import BIN, Sandbox, emit, median, parser, ratio

from rbee_common.api import ApiClient
from tests.sshd import SshLab, free_port


def wall(box: Sandbox, *argv: str) -> float:
    t0 = time.perf_counter()
    box.run(*argv)
    return (time.perf_counter() - t0) * 1000


def states(clients: list[ApiClient]) -> float:
    """Every daemon's GET /v2/state at once, as a fan-out does; wall time in ms."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(clients)) as pool:
        docs = list(pool.map(lambda c: c.json("GET", "/v2/state"), clients))
    took = (time.perf_counter() - t0) * 1000
    assert all(d["schema"] == "rbee.hive.status/v1" for d in docs)
    return took


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--hosts", default="1,8")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    counts = [int(n) for n in args.hosts.split(",")]
    if args.quick:
        counts, args.runs = [1], 1
    results: dict[str, Any] = {}
    with Sandbox() as box:
        lab = SshLab(box.root, box.root / "home", box.root / "config" / "hosts.toml",
                     str(BIN / "rbee-hive"))
        box.defer(lab.close)
        started: list[Any] = []

        def stop_daemons() -> None:
            for sshd in started:
                box.run("rbee-hive", "daemon", "stop", check=False,
                        RBEE_HOME=str(lab.rbee_home(sshd)))

        box.defer(stop_daemons)  # runs before lab.close: deferred calls run in reverse
        for n in counts:
            lab.start(n - len(lab.sshds))
            hosts = [s.name for s in lab.sshds]
            scope = [a for h in hosts for a in ("--host", h)]
            wall(box, "rbee", "pool", "status", *scope, "--format", "json")  # warm-up
            ssh = median([wall(box, "rbee", "pool", "status", *scope, "--format", "json")
                          for _ in range(args.runs)])
            for sshd in lab.sshds:
                if sshd in started:
                    continue
                box.run("rbee", "pool", "daemon", "start", "--host", sshd.name, "--port",
                        str(free_port(sshd.address)), "--format", "json")
                started.append(sshd)
            known = json.loads((box.root / "config" / "daemons.json").read_text())["daemons"]
            clients = [ApiClient(known[h]["url"], known[h]["token"]) for h in hosts]
            states(clients)  # warm-up
            state = median([states(clients) for _ in range(args.runs)])
            via_daemon = median([wall(box, "rbee", "pool", "status", *scope, "--format",
                                      "json") for _ in range(args.runs)])
            results[str(n)] = {"state_ms": state, "pool_status_daemon_ms": via_daemon,
                               "pool_status_ssh_ms": ssh,
                               "ssh_over_state": ratio(ssh, state),
                               "ssh_over_pool_status_daemon": ratio(ssh, via_daemon)}
            # the next count measures SSH before its own daemons exist: stop these for it
            if n != counts[-1]:
                stop_daemons()
                started.clear()
                (box.root / "config" / "daemons.json").unlink(missing_ok=True)
    emit({"benchmark": "daemon", "runs": args.runs, "hosts": results}, args.out)


if __name__ == "__main__":
    main()
