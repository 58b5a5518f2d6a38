"""rbee hosts …: the hosts of the pool (hosts.toml) and a preflight check of each."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from rbee_common.clikit import FormatOpt
from rbee_common.errors import RbeeError, UsageError
from rbee_common.output import Format, emit

app = typer.Typer(help="The hosts of the pool: list, add, rm, check.", no_args_is_help=True)

# The order a connection gets through: the first failing step explains everything after it.
CHECK_STEPS = ("reachable", "host_key", "auth", "hive", "schema")
FAILED_AT = {"HOST_UNREACHABLE": "reachable", "HOST_KEY_UNKNOWN": "host_key",
             "HOST_KEY_MISMATCH": "host_key", "SSH_AUTH_FAILED": "auth",
             "HIVE_NOT_INSTALLED": "hive", "SCHEMA_MISMATCH": "schema"}


@app.command("list")
def list_(fmt: FormatOpt = Format.text) -> None:
    """The hosts of hosts.toml (no network).

    Example: rbee hosts list --format json
    """
    from rbee_keeper.hosts import hosts_path, load_hosts
    from rbee_keeper.render import render_hosts

    hosts = [{"name": h.name, "transport": h.transport, "ssh": h.ssh, "hive": h.hive,
              "address": h.worker_address(), "bind": h.worker_bind(),
              "env_keys": sorted(h.env)} for h in load_hosts().values()]
    emit({"schema": "rbee.hosts/v1", "file": str(hosts_path()),
          "exists": hosts_path().is_file(), "hosts": hosts}, fmt, render_hosts)


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
    from pydantic import ValidationError

    from rbee_keeper.hosts import HostConfig, add_host
    from rbee_keeper.render import render_host_changed

    if local == (ssh is not None):
        raise UsageError("give --ssh USER@HOST or --local (one of them)")
    pairs = {}
    for item in env or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--env {item!r}: write KEY=VALUE")
        pairs[key] = value
    try:
        host = HostConfig(name=name, transport="local" if local else "ssh", ssh=ssh, hive=hive,
                          address=address, env=pairs)
    except ValidationError as e:
        raise UsageError(f"invalid host: {e.errors()[0]['msg']}") from e
    path = add_host(name, host)
    emit({"schema": "rbee.hosts.changed/v1", "action": "add", "name": name, "file": str(path)},
         fmt, render_host_changed)


@app.command()
def rm(name: Annotated[str, typer.Argument(help="The host to remove.")],
       fmt: FormatOpt = Format.text) -> None:
    """Remove a host from hosts.toml (its comments and the other hosts stay as they are).

    Example: rbee hosts rm mac
    """
    from rbee_keeper.hosts import remove_host
    from rbee_keeper.render import render_host_changed

    path = remove_host(name)
    emit({"schema": "rbee.hosts.changed/v1", "action": "rm", "name": name, "file": str(path)},
         fmt, render_host_changed)


def _checks(error: RbeeError | None) -> list[dict[str, Any]]:
    failed = FAILED_AT.get(error.code, "hive") if error else None
    out, seen_failure = [], False
    for step in CHECK_STEPS:
        if seen_failure:
            out.append({"check": step, "ok": None})
        elif step == failed:
            out.append({"check": step, "ok": False})
            seen_failure = True
        else:
            out.append({"check": step, "ok": True})
    return out


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
    from rbee_keeper.fanout import fan_out, overall
    from rbee_keeper.hive import Session
    from rbee_keeper.hosts import select
    from rbee_keeper.render import render_check

    hosts = select(None if all_ else names)
    with Session(accept_new_host_key) as session:
        outcomes = fan_out(hosts, lambda n: session.hive(hosts[n]).status(timeout=timeout),
                           timeout)
    state, code = overall(outcomes)
    docs = []
    for o in outcomes:
        d = o.to_dict("status")
        d["checks"] = _checks(o.error)
        docs.append(d)
    emit({"schema": "rbee.hosts.check/v1", "status": state, "hosts": docs}, fmt, render_check)
    return code
