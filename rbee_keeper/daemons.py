"""Pool daemons this controller started on its hosts: where each answers and its token.

Kept in $RBEE_CONFIG_DIR/daemons.json, mode 0600 (it holds bearer tokens), written by
`rbee pool daemon start --host NAME` and dropped by `rbee pool daemon stop --host NAME`. An
entry is only a hint: a daemon that does not answer is passed by (the host is reached over
SSH as before), so one that stopped on its own costs nothing but a refused connection.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rbee_common.errors import RemoteError, UsageError
from rbee_common.files import atomic_write_json, locked, read_json
from rbee_common.paths import config_dir
from rbee_common.progress import Reporter, null_reporter
from rbee_keeper.hosts import HostConfig
from rbee_keeper.queen.tokens import heartbeat_token

SCHEMA = "rbee.keeper.daemons/v1"

Doc = dict[str, Any]


@dataclass(frozen=True)
class KnownDaemon:
    host: str
    url: str
    token: str
    added_at: float = 0.0


def daemons_path() -> Path:
    return config_dir() / "daemons.json"


def load() -> dict[str, KnownDaemon]:
    doc = read_json(daemons_path(), default={}) or {}
    out = {}
    for name, entry in (doc.get("daemons") or {}).items():
        try:
            out[name] = KnownDaemon(**entry)
        except TypeError:
            continue  # an entry from another version: ignore it
    return out


def lookup(host: str) -> KnownDaemon | None:
    """The daemon this controller knows on `host`, if any."""
    return load().get(host)


def _save(daemons: dict[str, KnownDaemon]) -> None:
    atomic_write_json(daemons_path(), {"schema": SCHEMA, "daemons": {
        name: asdict(d) for name, d in sorted(daemons.items())}}, mode=0o600)


def remember(daemon: KnownDaemon) -> None:
    with locked(daemons_path().with_suffix(".lock")):
        _save({**load(), daemon.host: KnownDaemon(**{**asdict(daemon), "added_at": time.time()})})


def forget(host: str) -> None:
    with locked(daemons_path().with_suffix(".lock")):
        daemons = load()
        if daemons.pop(host, None) is not None:
            _save(daemons)


def queen_env(host: HostConfig) -> dict[str, str]:
    """RBEE_QUEEN_URL, RBEE_QUEEN_TOKEN and RBEE_HOST_NAME for a daemon on `host`, when this
    controller has a queen (configured, or running here); {} otherwise. The host's own env
    in hosts.toml wins over all of them (e.g. the queen's address as that host sees it)."""
    from rbee_common.daemon import running
    from rbee_keeper import queen_client
    from rbee_keeper.queen.serve import queen_files

    url = queen_client.configured_url()
    if url is None:
        state = running(queen_files())
        url = str(state["url"]) if state is not None else None
    if url is None and "RBEE_QUEEN_URL" not in host.env:
        return {}
    env = {"RBEE_HOST_NAME": host.name}
    if url is not None:
        env["RBEE_QUEEN_URL"] = url
        with contextlib.suppress(UsageError):  # no token here: the host's env must carry one
            env["RBEE_QUEEN_TOKEN"] = heartbeat_token(queen_client.target(url).token, host.name)
    return {**env, **{k: v for k, v in host.env.items() if k.startswith("RBEE_QUEEN_")}}


def _has(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def start_on_host(host: HostConfig, args: Sequence[str], hive: Any,
                  report: Reporter = null_reporter) -> Doc:
    """`rbee pool daemon start --host NAME`: start it bound where this controller reaches the
    host's workers, with the queen's settings in its environment (sent over stdin, never on
    a command line), then remember its URL and token."""
    from rbee_common.http import get_health

    args = list(args)
    if "--foreground" in args:
        raise UsageError("a daemon in the foreground would hold this command open",
                         hint=f"Run `rbee-hive daemon start --foreground` on {host.name} "
                              "itself (e.g. from a systemd unit).")
    if not _has(args, "--bind"):
        args += ["--bind", host.worker_bind()]
    env = {**host.env, **queen_env(host)}
    doc = hive.command(args, on_event=report, secrets={"env": env})
    token = str(hive.command(["daemon", "token"])["token"])
    url = host.worker_url(int(doc["port"]))
    remember(KnownDaemon(host.name, url, token))
    return {**doc, "host": host.name, "controller_url": url,
            "reachable": get_health(url, timeout=2.0) is not None}


def stop_on_host(host: HostConfig, args: Sequence[str], hive: Any,
                 report: Reporter = null_reporter) -> Doc:
    """`rbee pool daemon stop --host NAME`: stop it and forget it (also when it had stopped)."""
    try:
        doc = hive.command(list(args), on_event=report)
    except RemoteError as e:
        if e.code == "DAEMON_NOT_RUNNING":
            forget(host.name)
        raise
    forget(host.name)
    return {**doc, "host": host.name}
