"""rbee-hive worker …: start, watch and stop llm-worker-rbee processes on this host."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from rbee_common.clikit import FormatOpt, reporting
from rbee_common.errors import UsageError
from rbee_common.names import Backend
from rbee_common.output import Format, emit, write_json

app = typer.Typer(help="Start, list, watch and stop workers on this host.", no_args_is_help=True)

IdArg = Annotated[str, typer.Argument(metavar="ID", help="Worker id (see `worker list`).")]


@app.command()
def spawn(
    backend: Annotated[Backend, typer.Argument(help="cpu, cuda or metal.")],
    model: Annotated[str, typer.Option("--model", help="A model on this host (id or reference).")],
    device: Annotated[str, typer.Option(
        help="Device index; several GPUs of this host as 0,1 (one worker, layer split).")]
    = "0",
    tensor_split: Annotated[str | None, typer.Option(
        help="Each device's share with several, e.g. 0.6,0.4, --rpc lenders first (default: "
             "by available memory).")]
    = None,
    rpc: Annotated[str | None, typer.Option(
        help="Borrow memory from RPC lenders, HOST:PORT[,HOST:PORT] as this host reaches them "
             "(see `rbee-hive rpc start`).")] = None,
    port: Annotated[int | None, typer.Option(
        min=1, max=65535, help="Port (default: a free one in 8001–8999).")]
    = None,
    ctx: Annotated[int | None, typer.Option(
        min=16, help="Context size (default: min(4096, trained)).")]
    = None,
    bind: Annotated[str | None, typer.Option(
        help="Address the worker listens on (default 127.0.0.1 or $RBEE_WORKER_BIND).")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for the worker.")]
    = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return once started.")] = False,
    timeout: Annotated[float | None, typer.Option(
        min=0.001, help="Seconds to wait for ready (default 120 or $RBEE_LOAD_TIMEOUT).")] = None,
    token_stdin: Annotated[bool, typer.Option(
        "--token-stdin", help="Read the worker's bearer token from stdin's first line.")] = False,
    fmt: FormatOpt = Format.text,
) -> None:
    """Start a worker for a model: checks backend, device and memory, then waits until ready.

    Examples:
      rbee-hive worker spawn cpu --model gemma3-270m
      rbee-hive worker spawn cuda --model tinyllama --device 1 --ctx 8192
      rbee-hive worker spawn cuda --model llama-70b --rpc 127.0.0.1:50052,127.0.0.1:50053
    """
    from rbee_hive.ops import hive
    from rbee_hive.render import render_worker

    token = None
    if token_stdin:
        from rbee_hive.preamble import stdin_token

        token = stdin_token()
        if len(token) < 16:
            raise UsageError("--token-stdin needs a token of at least 16 characters on stdin")
    from rbee_common.clikit import parse_devices, parse_split
    from rbee_common.rpc import parse_endpoints

    devices = parse_devices(device) or (0,)
    lenders = parse_endpoints(rpc) if rpc else []
    with reporting(fmt) as report:
        record = hive().spawn(backend.value, model,
                              device=devices[0] if len(devices) == 1 else list(devices),
                              port=port, ctx=ctx, bind=bind, wait=not no_wait, timeout=timeout,
                              token=token, threads=threads,
                              tensor_split=parse_split(tensor_split), rpc=lenders,
                              report=report)
    emit(record, fmt, render_worker)


@app.command("list")
def list_(fmt: FormatOpt = Format.text) -> None:
    """Workers of this host, with their live state (dead ones marked, with their log's tail).

    Example: rbee-hive worker list --format json
    """
    from rbee_hive.ops import hive
    from rbee_hive.render import render_workers

    emit(hive().workers(), fmt, render_workers)


@app.command()
def health(wid: IdArg, fmt: FormatOpt = Format.text) -> None:
    """Ask one worker for its /health.

    Example: rbee-hive worker health cpu0-1a2b3c
    """
    from rbee_hive.ops import hive
    from rbee_hive.render import render_health

    emit(hive().worker_health(wid), fmt, render_health)


@app.command()
def logs(wid: IdArg,
         follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")]
         = False,
         lines: Annotated[int, typer.Option("--lines", "-n", min=0,
                                            help="Lines of history.")] = 50,
         fmt: FormatOpt = Format.text) -> None:
    """Print a worker's log (stdout and stderr of its process).

    Example: rbee-hive worker logs cpu0-1a2b3c --follow
    """
    from rbee_common.textsafe import for_terminal
    from rbee_hive.ops import hive

    ops = hive()
    if follow:
        for line in ops.follow_logs(wid, lines):
            if fmt is Format.text:
                sys.stdout.write(for_terminal(line, sys.stdout) + "\n")
                sys.stdout.flush()
            else:
                write_json({"event": "line", "line": line})
    elif fmt is Format.text:
        for line in ops.worker_logs(wid, lines)["lines"]:
            sys.stdout.write(for_terminal(line, sys.stdout) + "\n")
        sys.stdout.flush()
    else:
        from rbee_hive.render import render_logs

        emit(ops.worker_logs(wid, lines), fmt, render_logs)


@app.command()
def stop(wid: Annotated[str | None, typer.Argument(metavar="[ID]", help="Worker id.")] = None,
         all_: Annotated[bool, typer.Option("--all", help="Stop every worker of this host.")]
         = False,
         timeout: Annotated[float, typer.Option(min=0,
                                                help="Seconds between SIGTERM and SIGKILL.")]
         = 10.0,
         fmt: FormatOpt = Format.text) -> None:
    """Stop a worker (SIGTERM, then SIGKILL after --timeout) and remove its record.

    Examples:
      rbee-hive worker stop cpu0-1a2b3c
      rbee-hive worker stop --all
    """
    from rbee_hive.ops import hive
    from rbee_hive.render import render_stopped

    if all_ == (wid is not None):
        raise UsageError("give a worker ID or --all (not both)",
                         hint="Run `rbee-hive worker list` to see the ids.")
    if all_:
        emit(hive().stop_all(timeout), fmt, render_stopped)
    else:
        assert wid is not None
        emit(hive().stop(wid, timeout), fmt, render_stopped)


@app.command()
def token(wid: IdArg, fmt: FormatOpt = Format.text) -> None:
    """Print a worker's bearer token (to call it with curl or an OpenAI client).

    Example: curl -H "Authorization: Bearer $(rbee-hive worker token ID)" URL/v1/models
    """
    from rbee_hive.ops import hive
    from rbee_hive.render import render_token

    emit(hive().worker_token(wid), fmt, render_token)
