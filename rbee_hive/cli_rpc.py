"""rbee-hive rpc …: lend one device's memory to a worker elsewhere (llama.cpp's RPC server)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from rbee_common.clikit import FormatOpt, reporting
from rbee_common.errors import UsageError
from rbee_common.output import Format, emit, write_json

app = typer.Typer(help="Lend a device's memory to a worker on another host (llama.cpp RPC).",
                  no_args_is_help=True)

IdArg = Annotated[str, typer.Argument(metavar="ID", help="Lender id (see `rpc list`).")]


@app.command()
def start(
    device: Annotated[str, typer.Option(help="The device to lend: cpu:0 or cuda:N.")],
    port: Annotated[int | None, typer.Option(
        min=1, max=65535, help="Port (default: a free one in 50052–50251).")] = None,
    cache_dir: Annotated[Path | None, typer.Option(
        help="Keep large tensors here, so the next load of a model skips sending them.")]
    = None,
    bind: Annotated[str | None, typer.Option(
        help="Listen on this address instead of 127.0.0.1 (needs --insecure).")] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Allow --bind beyond loopback: llama.cpp's RPC has no "
                           "authentication and no encryption.")] = False,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for a cpu lender.")]
    = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return once started.")] = False,
    timeout: Annotated[float | None, typer.Option(
        min=0.001, help="Seconds to wait until it answers (default 60).")] = None,
    fmt: FormatOpt = Format.text,
) -> None:
    """Start a lender: llama.cpp's RPC server on one device, on loopback (reached over SSH).

    Examples:
      rbee-hive rpc start --device cuda:0
      rbee-hive rpc start --device cpu:0 --cache-dir ~/.cache/rbee-rpc --format json
    """
    from rbee_hive import documents
    from rbee_hive.render import render_lender

    with reporting(fmt) as report:
        record = documents.rpc_start(device, port=port, cache_dir=cache_dir, bind=bind,
                                     insecure=insecure, threads=threads, wait=not no_wait,
                                     timeout=timeout, report=report)
    emit(record, fmt, render_lender)


@app.command("list")
def list_(fmt: FormatOpt = Format.text) -> None:
    """Lenders of this host: device, endpoint, state (busy: serving a worker) and memory.

    Example: rbee-hive rpc list --format json
    """
    from rbee_hive import documents
    from rbee_hive.render import render_lenders

    emit(documents.rpc_list(), fmt, render_lenders)


@app.command()
def logs(lid: IdArg,
         follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")]
         = False,
         lines: Annotated[int, typer.Option("--lines", "-n", min=0,
                                            help="Lines of history.")] = 50,
         fmt: FormatOpt = Format.text) -> None:
    """Print a lender's log (llama.cpp's RPC server: clients accepted and closed).

    Example: rbee-hive rpc logs rpc-cpu0-1a2b3c
    """
    from rbee_common.textsafe import for_terminal
    from rbee_hive import documents
    from rbee_hive.lenders import follow_log

    if follow:
        for line in follow_log(lid, lines, True):
            if fmt is Format.text:
                sys.stdout.write(for_terminal(line, sys.stdout) + "\n")
                sys.stdout.flush()
            else:
                write_json({"event": "line", "line": line})
        return
    from rbee_hive.render import render_logs

    emit(documents.rpc_logs(lid, lines), fmt, render_logs)


@app.command()
def stop(lid: Annotated[str | None, typer.Argument(metavar="[ID]", help="Lender id.")] = None,
         all_: Annotated[bool, typer.Option("--all", help="Stop every lender of this host.")]
         = False,
         timeout: Annotated[float, typer.Option(min=0,
                                                help="Seconds between SIGTERM and SIGKILL.")]
         = 10.0,
         fmt: FormatOpt = Format.text) -> None:
    """Stop a lender and remove its record (a worker borrowing from it ends too).

    Examples:
      rbee-hive rpc stop rpc-cuda0-1a2b3c
      rbee-hive rpc stop --all
    """
    from rbee_hive import documents
    from rbee_hive.render import render_stopped

    if all_ == (lid is not None):
        raise UsageError("give a lender ID or --all (not both)",
                         hint="Run `rbee-hive rpc list` to see the ids.")
    if all_:
        emit(documents.rpc_stop_all(timeout), fmt, render_stopped)
    else:
        assert lid is not None
        emit(documents.rpc_stop(lid, timeout), fmt, render_stopped)
