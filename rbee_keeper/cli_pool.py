"""rbee pool …: any rbee-hive command on a host, and the status of the whole pool."""

from __future__ import annotations

import secrets
import sys

import typer

from rbee_common.clikit import reporting
from rbee_common.errors import UsageError
from rbee_common.output import EXIT_OK, Format, emit, write_json

USAGE = """Usage: rbee pool status [--host NAME ...] [--timeout S] [--format text|json]
       rbee pool <rbee-hive command> --host NAME [--format text|json|ndjson]

Run rbee-hive commands on the hosts of the pool. `status` asks every host (or the --host
ones) in parallel; any other command runs on the one --host, with its progress shown here.

Examples:
  rbee pool status
  rbee pool models download tinyllama --host mac
  rbee pool worker spawn cuda --model tinyllama --device 1 --host workstation
  rbee pool worker logs cuda1-3f2a1c --follow --host workstation
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
            timeout = float(value)
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
    from rbee_keeper.fanout import fan_out, overall
    from rbee_keeper.hive import Session
    from rbee_keeper.hosts import select
    from rbee_keeper.render import render_pool_status

    hosts = select(names or None)
    with Session(accept_new) as session:
        outcomes = fan_out(hosts, lambda n: session.hive(hosts[n]).status(timeout=timeout),
                           timeout)
    state, code = overall(outcomes)
    emit({"schema": "rbee.pool.status/v1", "status": state,
          "hosts": [o.to_dict("status") for o in outcomes]}, fmt, render_pool_status)
    return code


def _passthrough(name: str, rest: list[str], fmt: Format, accept_new: bool) -> int:
    from rbee_hive.render import render
    from rbee_keeper import cache
    from rbee_keeper.hive import Session
    from rbee_keeper.hosts import get_host
    from rbee_keeper.infer import url_for

    host = get_host(name)
    with Session(accept_new) as session:
        hive = session.hive(host)
        if "--help" in rest or "-h" in rest:
            reply = hive.transport.run(rest, on_line=lambda line: print(line))
            return reply.exit_code
        if rest[:2] == ["worker", "logs"] and ({"--follow", "-f"} & set(rest)):
            def show(line: str) -> None:
                if fmt is Format.text:
                    print(line, flush=True)
                else:
                    write_json({"event": "line", "line": line})

            reply = hive.stream([*rest, "--format", "ndjson"], on_line=show)
            if reply.error is not None:
                hive.result(reply)
            return reply.exit_code
        token = None
        if rest[:2] == ["worker", "spawn"]:
            token = secrets.token_urlsafe(32)
            rest = [*rest, "--token-stdin"]
            if "--bind" not in rest:
                rest += ["--bind", host.worker_bind()]
        with reporting(fmt) as report:
            doc = hive.call(*rest, on_event=report, token=token)
    if token is not None:
        cache.remember(cache.KnownWorker(
            host=name, id=doc["id"], url=url_for(host, doc["port"]), token=token,
            model=doc["model"], backend=doc["backend"], device=doc["device"], ctx=doc["ctx"]))
    if rest[:2] == ["worker", "stop"]:
        for stopped in doc.get("stopped", [doc]):
            cache.forget(stopped["id"], name)
    emit(doc, fmt, render)
    return EXIT_OK
