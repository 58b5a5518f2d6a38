"""Calling rbee-hive on a host and reading its documents; one Session per invocation."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from rbee_common.errors import RbeeError, RemoteError
from rbee_common.progress import Reporter
from rbee_hive.schemas import HIVE_SCHEMA_VERSION, schema_version
from rbee_keeper.errors import SchemaMismatch
from rbee_keeper.hosts import HostConfig
from rbee_keeper.transport import HiveReply, Transport, make_transport


class Hive:
    """One host's rbee-hive, reached through its transport."""

    def __init__(self, host: HostConfig, transport: Transport) -> None:
        self.host = host
        self.transport = transport

    def call(self, *args: str, on_event: Reporter | None = None, token: str | None = None,
             timeout: float | None = None) -> dict[str, Any]:
        """Run `rbee-hive ARGS --format ndjson`; return its result or raise its error."""
        secrets = {"token": token} if token else None
        reply = self.transport.run([*args, "--format", "ndjson"], secrets=secrets,
                                   on_event=on_event, timeout=timeout)
        return self.result(reply)

    def stream(self, args: list[str], on_line: Callable[[str], None],
               on_event: Reporter | None = None) -> HiveReply:
        """Run a command whose output is lines (logs --follow), passing each one on."""
        return self.transport.run(args, on_event=on_event, on_line=on_line)

    def result(self, reply: HiveReply) -> dict[str, Any]:
        name = self.host.name
        if reply.error is not None:
            err = RemoteError.from_envelope(reply.error, exit_code=reply.exit_code or 1)
            err.details.setdefault("host", name)
            raise err
        if reply.result is None:
            said = (reply.stderr.strip() or "\n".join(reply.stray)).strip()
            if "stdin-json" in said or "ndjson" in said:
                raise SchemaMismatch(f"{name}: its rbee-hive is too old to talk to this rbee",
                                     hint=f"Update it: rbee pool git pull --host {name}")
            last = said.splitlines()[-1] if said else "no output"
            raise RbeeError(f"{name}: rbee-hive exited with status {reply.exit_code} and no "
                            f"result: {last}", host=name)
        version = schema_version(reply.result)
        if version != HIVE_SCHEMA_VERSION:
            raise SchemaMismatch(
                f"{name}: rbee-hive speaks schema v{version}, this rbee speaks "
                f"v{HIVE_SCHEMA_VERSION} ({reply.result.get('schema')!r})",
                hint=f"Run the same rbee version on both: rbee pool git pull --host {name}",
                host=name, remote_schema=reply.result.get("schema"))
        return reply.result

    def status(self, timeout: float | None = None) -> dict[str, Any]:
        return self.call("status", timeout=timeout)


class Session:
    """The transports of one rbee invocation: one connection per host, closed at the end."""

    def __init__(self, accept_new_host_key: bool = False) -> None:
        self.accept_new = accept_new_host_key
        self._hives: dict[str, Hive] = {}
        self._lock = threading.Lock()

    def hive(self, host: HostConfig) -> Hive:
        with self._lock:
            if host.name not in self._hives:
                self._hives[host.name] = Hive(host, make_transport(host, self.accept_new))
            return self._hives[host.name]

    def close(self) -> None:
        for hive in self._hives.values():
            hive.transport.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
