"""rbee pool …: any rbee-hive command on a host, and the status of the whole pool."""

from __future__ import annotations

import sys

import typer

from rbee_common.clikit import reporting
from rbee_common.errors import UsageError
from rbee_common.output import EXIT_OK, Format, emit, write_json
from rbee_common.textsafe import for_terminal

USAGE = """Usage: rbee pool status [--host NAME ...] [--timeout S] [--format text|json]
       rbee pool <rbee-hive command> --host NAME [--format text|json|ndjson]

Run rbee-hive commands on the hosts of the pool. `status` asks every host (or the --host
ones) in parallel; any other command runs on the one --host, with its progress shown here.

Examples:
  rbee pool status
  rbee pool models download tinyllama --host mac
  rbee pool worker spawn cuda --model tinyllama --device 1 --host workstation
  rbee pool worker logs cuda1-3f2a1c --follow --host workstation
  rbee pool daemon start --host workstation    # from then on reached over HTTP, not SSH
"""


def _parse(args: list[str]) -> tuple[list[str], Format, float, bool, list[str]]:
    hosts: list[str] = []
    fmt, timeout, accept_new, rest = Format.text, 20.0, False, []
    it = iter(args)
    for arg in it:
        name, eq, value = arg.partition("=")
        if name in ("--host", "--format", "--timeout") and not eq:
            value = next(it, "")
            if not value:
                raise UsageError(f"{name} needs a value", hint="Run `rbee pool --help`.")
        if name == "--host":
            hosts.append(value)
        elif name == "--format":
            if value not in Format.__members__:
                raise UsageError(f"--format {value!r}: choose text, json or ndjson")
            fmt = Format(value)
        elif name == "--timeout":
            try:
                timeout = float(value)
            except ValueError:
                timeout = -1.0
            if not 0 < timeout <= 3600:
                raise UsageError(f"--timeout {value!r}: give seconds, more than 0")
        elif arg == "--accept-new-host-key":
            accept_new = True
        else:
            rest.append(arg)
    return hosts, fmt, timeout, accept_new, rest


def pool(ctx: typer.Context) -> int:
    """Run rbee-hive commands on pool hosts: `rbee pool status`, `rbee pool <cmd> --host NAME`."""
    args = list(ctx.args)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return EXIT_OK
    hosts, fmt, timeout, accept_new, rest = _parse(args)
    if rest == ["status"]:
        return _status(hosts, fmt, timeout, accept_new)
    if len(hosts) != 1:
        raise UsageError(f"`rbee pool {' '.join(rest[:2])}` runs on one host: add --host NAME",
                         hint="`rbee pool status` is the only command for many hosts.")
    return _passthrough(hosts[0], rest, fmt, accept_new)


def _status(names: list[str], fmt: Format, timeout: float, accept_new: bool) -> int:
    from rbee_keeper.fanout import exit_code
    from rbee_keeper.hive import Session
    from rbee_keeper.hosts import select
    from rbee_keeper.pool import pool_status
    from rbee_keeper.render import render_pool_status

    with Session(accept_new) as session:
        doc = pool_status(select(names or None), session, timeout)
    emit(doc, fmt, render_pool_status)
    return exit_code(doc["status"])


def _passthrough(name: str, rest: list[str], fmt: Format, accept_new: bool) -> int:
    from rbee_hive.render import render
    from rbee_keeper import pool
    from rbee_keeper.hive import Session
    from rbee_keeper.hosts import get_host

    host = get_host(name)
    with Session(accept_new) as session:
        if "--help" in rest or "-h" in rest:
            return pool.stream_on_host(host, rest, session,
                                       on_line=lambda line: print(for_terminal(line, sys.stdout)))
        if rest[:2] == ["worker", "logs"] and ({"--follow", "-f"} & set(rest)):
            def show(line: str) -> None:
                if fmt is Format.text:
                    print(for_terminal(line, sys.stdout), flush=True)
                else:
                    write_json({"event": "line", "line": line})

            return pool.stream_on_host(host, [*rest, "--format", "ndjson"], session, show)
        with reporting(fmt) as report:
            doc = pool.run_on_host(host, rest, session, report)
    emit(doc, fmt, render)
    return EXIT_OK
