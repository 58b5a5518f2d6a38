"""rbee hosts …: the hosts of the pool (hosts.toml) and a preflight check of each."""

from __future__ import annotations

from typing import Annotated

import typer

from rbee_common.clikit import FormatOpt
from rbee_common.output import Format, emit

app = typer.Typer(help="The hosts of the pool: list, add, rm, check, install.",
                  no_args_is_help=True)


@app.command("list")
def list_(fmt: FormatOpt = Format.text) -> None:
    """The hosts of hosts.toml (no network).

    Example: rbee hosts list --format json
    """
    from rbee_keeper.hosts import hosts_document
    from rbee_keeper.render import render_hosts

    emit(hosts_document(), fmt, render_hosts)


@app.command()
def add(
    name: Annotated[str, typer.Argument(help="A short name, e.g. mac.")],
    ssh: Annotated[str | None, typer.Option(help="USER@HOST[:PORT] or an ~/.ssh/config alias.")]
    = None,
    local: Annotated[bool, typer.Option("--local", help="This machine, without SSH.")] = False,
    hive: Annotated[str, typer.Option(help="The remote rbee-hive command.")] = "rbee-hive",
    address: Annotated[str | None, typer.Option(
        help="Where its workers are reached (default: the SSH host).")] = None,
    env: Annotated[list[str] | None, typer.Option(
        help="KEY=VALUE for the remote rbee-hive (repeatable); sent over stdin, never argv.")]
    = None,
    fmt: FormatOpt = Format.text,
) -> None:
    """Add a host to hosts.toml.

    Examples:
      rbee hosts add mac --ssh vince@mac.home.arpa --hive ~/.venvs/rbee/bin/rbee-hive
      rbee hosts add workstation --ssh workstation --env RBEE_HOME=/data/rbee
    """
    from rbee_keeper.hosts import add_host, new_host
    from rbee_keeper.render import render_host_changed

    host = new_host(name, ssh=ssh, local=local, hive=hive, address=address, env=env or [])
    emit(add_host(name, host), fmt, render_host_changed)


@app.command()
def rm(name: Annotated[str, typer.Argument(help="The host to remove.")],
       fmt: FormatOpt = Format.text) -> None:
    """Remove a host from hosts.toml (its comments and the other hosts stay as they are).

    Example: rbee hosts rm mac
    """
    from rbee_keeper.hosts import remove_host
    from rbee_keeper.render import render_host_changed

    emit(remove_host(name), fmt, render_host_changed)


@app.command()
def check(
    names: Annotated[list[str] | None, typer.Argument(metavar="[NAME]...",
                                                      help="Hosts to check (default: all).")]
    = None,
    all_: Annotated[bool, typer.Option("--all", help="Check every host.")] = False,
    accept_new_host_key: Annotated[bool, typer.Option(
        "--accept-new-host-key", help="Trust and remember a host key not yet in known_hosts.")]
    = False,
    timeout: Annotated[float, typer.Option(help="Seconds per host.")] = 20.0,
    fmt: FormatOpt = Format.text,
) -> int:
    """Preflight each host: reachable, host key known, login, rbee-hive found, same schema.

    Examples:
      rbee hosts check --all
      rbee hosts check mac --accept-new-host-key
    """
    from rbee_keeper.fanout import exit_code
    from rbee_keeper.hive import Session, command_hive
    from rbee_keeper.hosts import select
    from rbee_keeper.pool import check_hosts
    from rbee_keeper.render import render_check

    # a preflight of the way every host is reached: SSH (or local), never a pool daemon
    with Session(accept_new_host_key, factory=command_hive) as session:
        doc = check_hosts(select(None if all_ else names), session, timeout)
    emit(doc, fmt, render_check)
    return exit_code(doc["status"])


@app.command()
def install(
    names: Annotated[list[str] | None, typer.Argument(metavar="[NAME]...",
                                                      help="Hosts to install on.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every SSH host, in parallel.")] = False,
    ssh: Annotated[str | None, typer.Option(
        help="USER@HOST[:PORT] or an ~/.ssh/config alias: add NAME to hosts.toml once it is "
             "installed.")] = None,
    env: Annotated[list[str] | None, typer.Option(
        help="KEY=VALUE for a new host (with --ssh; repeatable): its hosts.toml env, sent over "
             "stdin, never argv.")] = None,
    backend: Annotated[str, typer.Option(
        help="auto (cuda with an NVIDIA driver and nvcc, metal on an arm64 Mac, else cpu), "
             "cuda, metal or cpu.")] = "auto",
    prefix: Annotated[str | None, typer.Option(
        help="Where on the host the venv goes (default: its $RBEE_HOME).")] = None,
    upgrade: Annotated[bool, typer.Option(
        "--upgrade", help="Replace an install of another rbee version or backend.")] = False,
    accept_new_host_key: Annotated[bool, typer.Option(
        "--accept-new-host-key", help="Trust and remember a host key not yet in known_hosts.")]
    = False,
    fmt: FormatOpt = Format.text,
) -> int:
    """Install this rbee on hosts over SSH, point hosts.toml at it, and check them.

    Needs only Python 3.11+ and a C/C++ compiler on the host; llama-cpp-python is built for
    its GPU (RPC included). Running it again is a no-op while the versions match.

    Examples:
      rbee hosts install gpu1 --ssh me@gpu1.home.arpa
      rbee hosts install --all --upgrade
    """
    from rbee_common.clikit import reporting
    from rbee_keeper.fanout import exit_code
    from rbee_keeper.install import InstallOptions, install_hosts
    from rbee_keeper.render import render_install

    opts = InstallOptions(backend=backend, prefix=prefix, upgrade=upgrade,
                          accept_new_host_key=accept_new_host_key)
    with reporting(fmt) as report:
        doc = install_hosts(list(names or []), opts, all_hosts=all_, ssh=ssh, env=env,
                            report=report)
    emit(doc, fmt, render_install)
    return exit_code(doc["status"])
