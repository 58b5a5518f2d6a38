"""rbee workers …: the workers of every host."""

from __future__ import annotations

from typing import Annotated

import typer

from rbee_common.clikit import FormatOpt
from rbee_common.errors import UsageError
from rbee_common.output import Format, emit

app = typer.Typer(help="Workers across all hosts: list, stop.", no_args_is_help=True)

HostsOpt = Annotated[list[str] | None, typer.Option("--host", help="Only these hosts.")]
TimeoutOpt = Annotated[float, typer.Option(help="Seconds per host.")]


@app.command("list")
def list_(host: HostsOpt = None, timeout: TimeoutOpt = 20.0, fmt: FormatOpt = Format.text) -> int:
    """Every worker on every host (in parallel), with its state.

    Example: rbee workers list --format json | jq '.workers[] | select(.state == "ready")'
    """
    from rbee_keeper.fanout import exit_code
    from rbee_keeper.hive import Session
    from rbee_keeper.hosts import select
    from rbee_keeper.pool import list_workers
    from rbee_keeper.render import render_workers

    with Session() as session:
        doc = list_workers(select(host), session, timeout)
    emit(doc, fmt, render_workers)
    return exit_code(doc["status"])


@app.command()
def stop(wid: Annotated[str | None, typer.Argument(metavar="[ID]", help="Worker id.")] = None,
         host: Annotated[str | None, typer.Option(
             "--host", help="The worker's host (looked up when not given).")] = None,
         all_: Annotated[bool, typer.Option(
             "--all", help="Stop every worker of every host (or of --host).")] = False,
         timeout: TimeoutOpt = 20.0,
         fmt: FormatOpt = Format.text) -> int:
    """Stop a worker wherever it runs, or every worker with --all.

    Examples:
      rbee workers stop cuda0-3f2a1c
      rbee workers stop --all --host workstation
    """
    from rbee_keeper import pool
    from rbee_keeper.fanout import exit_code
    from rbee_keeper.hive import Session
    from rbee_keeper.hosts import get_host, select
    from rbee_keeper.render import render_stopped_all

    if all_ == (wid is not None):
        raise UsageError("give a worker ID or --all (not both)",
                         hint="Run `rbee workers list` to see the ids.")
    with Session() as session:
        if all_:
            doc = pool.stop_all_workers(select([host] if host else None), session, timeout)
            emit(doc, fmt, render_stopped_all)
            return exit_code(doc["status"])
        assert wid is not None
        hosts = select(None)
        name = host or pool.locate_worker(wid, hosts, session, timeout)
        doc = pool.stop_worker(wid, get_host(name, hosts), session)
    from rbee_hive.render import render_stopped

    emit(doc, fmt, render_stopped)
    return 0
