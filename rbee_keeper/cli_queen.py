"""rbee queen …: the optional always-on daemon on the controller (job queue, OpenAI gateway)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from rbee_common.clikit import FormatOpt
from rbee_common.output import Format, emit

app = typer.Typer(help="The queen: a job queue and one OpenAI endpoint for the whole pool.",
                  no_args_is_help=True)

PortOpt = Annotated[int, typer.Option(help="Port to listen on.")]
BindOpt = Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: the whole LAN).")]


@app.command()
def start(port: PortOpt = 8080, bind: BindOpt = "127.0.0.1",
          foreground: Annotated[bool, typer.Option(
              "--foreground", help="Run in this process (for systemd).")] = False,
          ttl: Annotated[float, typer.Option(
              help="Seconds an idle worker is kept (0 = for ever); per model: `ttl` in "
                   "catalog.toml.")] = 300.0,
          queue_size: Annotated[int, typer.Option(
              help="Jobs that may wait; more get 429 with Retry-After.")] = 64,
          poll_interval: Annotated[float, typer.Option(
              help="Seconds between status checks of hosts without a pool daemon.")] = 2.0,
          fmt: FormatOpt = Format.text) -> int:
    """Start the queen; returns once it answers /health, and prints its URL.

    Examples:
      rbee queen start
      rbee queen start --bind 0.0.0.0 --port 8080 --ttl 600
    """
    from rbee_keeper import queen_ctl
    from rbee_keeper.render import render_queen

    opts = queen_ctl.options(port=port, bind=bind, ttl=ttl, queue_size=queue_size,
                             poll_interval=poll_interval)
    if foreground:
        return queen_ctl.run_foreground(opts)
    emit(queen_ctl.start(opts), fmt, render_queen)
    return 0


@app.command()
def stop(fmt: FormatOpt = Format.text) -> None:
    """Stop the queen (running jobs are cancelled; workers keep running until their TTL).

    Example: rbee queen stop
    """
    from rbee_keeper import queen_ctl
    from rbee_keeper.render import render_queen

    emit(queen_ctl.stop(), fmt, render_queen)


@app.command()
def status(fmt: FormatOpt = Format.text) -> None:
    """Whether the queen runs, where, and its queue and workers.

    Example: rbee queen status --format json
    """
    from rbee_keeper import queen_ctl
    from rbee_keeper.render import render_queen

    emit(queen_ctl.status(), fmt, render_queen)


@app.command()
def token(fmt: FormatOpt = Format.text) -> None:
    """Print the queen's bearer token (for OpenAI clients: it is their API key).

    Example: OPENAI_API_KEY=$(rbee queen token) OPENAI_BASE_URL=http://localhost:8080/v1 llm …
    """
    from rbee_keeper import queen_ctl
    from rbee_keeper.render import render_token_doc

    emit(queen_ctl.token_doc(), fmt, render_token_doc)


@app.command()
def logs(follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing.")] = False,
         lines: Annotated[int, typer.Option("--lines", "-n", help="Lines of history.")] = 50
         ) -> None:
    """Print the queen's log.

    Example: rbee queen logs -f
    """
    from rbee_common.textsafe import for_terminal
    from rbee_keeper import queen_ctl

    for line in queen_ctl.log_lines(lines, follow):
        sys.stdout.write(for_terminal(line, sys.stdout) + "\n")
        sys.stdout.flush()
