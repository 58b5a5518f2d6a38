"""rbee-hive daemon …: this host's pool daemon (an HTTP API over the same commands)."""

from __future__ import annotations

from typing import Annotated

import typer

from rbee_common.clikit import FormatOpt
from rbee_common.output import Format, emit

app = typer.Typer(help="The pool daemon: this host's hive over HTTP, watching its workers.",
                  no_args_is_help=True)


@app.command()
def start(port: Annotated[int, typer.Option(help="Port to listen on.")] = 9200,
          bind: Annotated[str, typer.Option(
              help="Address to listen on (0.0.0.0: the whole LAN).")] = "127.0.0.1",
          foreground: Annotated[bool, typer.Option(
              "--foreground", help="Run in this process (for systemd).")] = False,
          heartbeat_interval: Annotated[float, typer.Option(
              help="Seconds between heartbeats to the queen (RBEE_QUEEN_URL, "
                   "RBEE_QUEEN_TOKEN, RBEE_HOST_NAME).")] = 1.5,
          fmt: FormatOpt = Format.text) -> int:
    """Start the pool daemon; returns once it answers /health, and prints its URL.

    While it runs, rbee-hive commands on this host go through it.

    Examples:
      rbee-hive daemon start
      RBEE_QUEEN_URL=http://queen:8080 RBEE_QUEEN_TOKEN=… rbee-hive daemon start --bind 0.0.0.0
    """
    from rbee_hive.daemon import ctl
    from rbee_hive.render import render_daemon

    opts = ctl.options(port=port, bind=bind, heartbeat_interval=heartbeat_interval)
    if foreground:
        return ctl.run_foreground(opts)
    emit(ctl.start(opts), fmt, render_daemon)
    return 0


@app.command()
def stop(fmt: FormatOpt = Format.text) -> None:
    """Stop the pool daemon (workers keep running; commands run here again).

    Example: rbee-hive daemon stop
    """
    from rbee_hive.daemon import ctl
    from rbee_hive.render import render_daemon

    emit(ctl.stop(), fmt, render_daemon)


@app.command()
def status(fmt: FormatOpt = Format.text) -> None:
    """Whether the pool daemon runs, where, and whether its heartbeats reach the queen.

    Example: rbee-hive daemon status --format json
    """
    from rbee_hive.daemon import ctl
    from rbee_hive.render import render_daemon

    emit(ctl.status(), fmt, render_daemon)


@app.command()
def token(fmt: FormatOpt = Format.text) -> None:
    """Print the pool daemon's bearer token.

    Example: curl -H "Authorization: Bearer $(rbee-hive daemon token)" localhost:9200/v2/state
    """
    from rbee_hive.daemon import ctl
    from rbee_hive.render import render_token

    emit(ctl.token_doc(), fmt, render_token)
