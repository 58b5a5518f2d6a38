"""rbee-hive: models, devices and workers of this host. Run here, or by `rbee` over SSH."""

from __future__ import annotations

from typing import Annotated

import typer

from rbee_common.clikit import FormatOpt, VersionOpt, root_app
from rbee_common.output import Format, emit, run_app
from rbee_hive.cli_daemon import app as daemon_app
from rbee_hive.cli_models import app as models_app
from rbee_hive.cli_rpc import app as rpc_app
from rbee_hive.cli_worker import app as worker_app

app = root_app("rbee-hive",
               "Models, GPU inventory and workers of this host (rbee's per-host half).")
app.add_typer(models_app, name="models")
app.add_typer(worker_app, name="worker")
app.add_typer(daemon_app, name="daemon")
app.add_typer(rpc_app, name="rpc")
git_app = typer.Typer(help="Update the rbee checkout this hive runs from.", no_args_is_help=True)
app.add_typer(git_app, name="git")


@app.callback()
def _root(
    version: VersionOpt = None,
    stdin_json: Annotated[bool, typer.Option(
        "--stdin-json", hidden=True,
        help="Read {env, token} as one JSON line from stdin (how `rbee` passes secrets).")]
    = False,
) -> None:
    """Models, GPU inventory and workers of this host (rbee's per-host half)."""
    if stdin_json:
        from rbee_hive.preamble import read_preamble

        read_preamble()


@app.command()
def status(fmt: FormatOpt = Format.text) -> None:
    """Host, backends, devices, models and workers: one document.

    Example: rbee-hive status --format json | jq '.workers[].state'
    """
    from rbee_hive.ops import hive
    from rbee_hive.render import render_status

    emit(hive().status(), fmt, render_status)


@app.command()
def detect(fmt: FormatOpt = Format.text) -> None:
    """Backends (cuda via NVML, metal, cpu) and devices with total and free memory.

    Example: rbee-hive detect --format json
    """
    from rbee_hive.ops import hive
    from rbee_hive.render import render_detect

    emit(hive().detect(), fmt, render_detect)


@git_app.command("status")
def git_status(fmt: FormatOpt = Format.text) -> None:
    """Branch, commit and whether the checkout is behind its upstream."""
    from rbee_hive import gitops
    from rbee_hive.render import render_git

    emit(gitops.status(), fmt, render_git)


@git_app.command("pull")
def git_pull(fmt: FormatOpt = Format.text) -> None:
    """Fast-forward the checkout to its upstream (git pull --ff-only)."""
    from rbee_hive import gitops
    from rbee_hive.render import render_git

    emit(gitops.pull(), fmt, render_git)


def main() -> None:
    from rbee_hive.preamble import command_line

    run_app(app, "rbee-hive", prepare=command_line)
