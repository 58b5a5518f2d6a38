"""rbee workers …: the workers of every host."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from rbee_common.clikit import FormatOpt
from rbee_common.output import Format, emit

app = typer.Typer(help="Workers across all hosts: list, stop.", no_args_is_help=True)


def _list(names: list[str] | None, timeout: float) -> tuple[list[Any], list[dict[str, Any]]]:
    from rbee_keeper.fanout import fan_out
    from rbee_keeper.hive import Session
    from rbee_keeper.hosts import select
    from rbee_keeper.infer import url_for

    hosts = select(names)
    with Session() as session:
        outcomes = fan_out(hosts, lambda n: session.hive(hosts[n]).call(
            "worker", "list", timeout=timeout)["workers"], timeout)
    flat = []
    for o in outcomes:
        for w in o.value or []:
            flat.append({**w, "host": o.name, "url": url_for(hosts[o.name], w["port"])})
    return outcomes, flat


@app.command("list")
def list_(host: Annotated[list[str] | None, typer.Option("--host", help="Only these hosts.")]
          = None,
          timeout: Annotated[float, typer.Option(help="Seconds per host.")] = 20.0,
          fmt: FormatOpt = Format.text) -> int:
    """Every worker on every host (in parallel), with its state.

    Example: rbee workers list --format json | jq '.workers[] | select(.state == "ready")'
    """
    from rbee_keeper.fanout import overall
    from rbee_keeper.render import render_workers

    outcomes, flat = _list(host, timeout)
    state, code = overall(outcomes)
    emit({"schema": "rbee.workers/v1", "status": state,
          "hosts": [o.to_dict("workers") for o in outcomes], "workers": flat},
         fmt, render_workers)
    return code


@app.command()
def stop(wid: Annotated[str, typer.Argument(metavar="ID", help="Worker id.")],
         host: Annotated[str | None, typer.Option("--host", help="The worker's host.")] = None,
         fmt: FormatOpt = Format.text) -> None:
    """Stop a worker wherever it runs (its host is looked up when not given).

    Example: rbee workers stop cuda0-3f2a1c
    """
    from rbee_common.errors import WorkerNotFound
    from rbee_hive.render import render_stopped
    from rbee_keeper import cache
    from rbee_keeper.hive import Session
    from rbee_keeper.hosts import get_host

    if host is None:
        known = [w.host for w in cache.load() if w.id == wid]
        if known:
            host = known[0]
        else:
            _, flat = _list(None, 20.0)
            found = [w["host"] for w in flat if w["id"] == wid]
            if not found:
                raise WorkerNotFound(f"no host has a worker {wid!r}")
            host = found[0]
    with Session() as session:
        doc = session.hive(get_host(host)).call("worker", "stop", wid)
    cache.forget(wid, host)
    emit({**doc, "host": host}, fmt, render_stopped)
