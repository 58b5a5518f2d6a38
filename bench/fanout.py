"""`rbee pool status` over 1, 2, 4, 8 loopback sshd hosts: parallel wall time against the
same hosts asked one after another, and against one `rbee-hive status` run locally.

    python bench/fanout.py [--hosts 1,2,4,8] [--runs 3]
"""

from __future__ import annotations

import time
from typing import Any

from _common import BIN, Sandbox, emit, median, parser, ratio

from tests.sshd import SshLab


def wall(box: Sandbox, *argv: str) -> float:
    t0 = time.perf_counter()
    box.run(*argv)
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--hosts", default="1,2,4,8")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    counts = [int(n) for n in args.hosts.split(",")]
    if args.quick:
        counts, args.runs = [1, 2], 1
    results: dict[str, Any] = {}
    with Sandbox() as box:
        local = median([wall(box, "rbee-hive", "status", "--format", "json")
                        for _ in range(args.runs)])
        lab = SshLab(box.root, box.root / "home", box.root / "config" / "hosts.toml",
                     str(BIN / "rbee-hive"))
        box.defer(lab.close)
        for n in counts:
            lab.start(n - len(lab.sshds))
            names = [s.name for s in lab.sshds]
            parallel = median([wall(box, "rbee", "pool", "status", "--format", "json")
                               for _ in range(args.runs)])
            serial = median([sum(wall(box, "rbee", "pool", "status", "--host", name,
                                      "--format", "json") for name in names)
                             for _ in range(args.runs)])
            results[str(n)] = {"parallel_ms": parallel, "serial_ms": serial,
                               "parallel_vs_serial": ratio(parallel, serial),
                               "parallel_vs_local_status": ratio(parallel, local)}
    emit({"benchmark": "fanout", "local_hive_status_ms": local, "runs": args.runs,
          "hosts": results}, args.out)


if __name__ == "__main__":
    main()
