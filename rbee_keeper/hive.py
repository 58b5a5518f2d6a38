"""The keeper's client of one host's hive: typed calls, several ways to reach it.

Callers see `HiveClient` only — `status()`, `download()`, `spawn()`, `stop()`, `token()`,
`logs()` — and never build an argument list. Two implementations run `rbee-hive …
--format ndjson` as a command: `LocalHive` (a subprocess of this controller) and `SshHive`
(over one SSH connection per host); `HttpHive` (rbee_keeper.hive_http) calls the host's pool
daemon. `make_hive` gives a `RoutedHive`, which picks the daemon when this controller
started one there and it answers, else the command transport — on every call (fabric's
`Connection`: same calls, local or remote).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from rbee_common.api import DaemonConnectionLost, DaemonUnreachable
from rbee_common.errors import RbeeError, RemoteError, UsageError
from rbee_common.progress import Reporter
from rbee_common.spawning import SpawnRequest
from rbee_hive.schemas import HIVE_SCHEMA_VERSION, schema_version
from rbee_keeper.errors import SchemaMismatch
from rbee_keeper.hosts import HostConfig
from rbee_keeper.transport import HiveReply, LocalTransport, SshTransport, Transport

Doc = dict[str, Any]
T = TypeVar("T")

log = logging.getLogger("rbee.keeper.hive")


class HiveClient(Protocol):
    """One host's hive, however it is reached."""

    host: HostConfig

    def status(self, timeout: float | None = None) -> Doc:
        """The `rbee.hive.status/v1` document."""
        ...

    def workers(self, timeout: float | None = None) -> list[Doc]:
        """The host's worker records, with their live state."""
        ...

    def download(self, ref: str, *, model_id: str | None = None, sha256: str | None = None,
                 on_event: Reporter | None = None) -> Doc:
        """Make a model present on the host (resumable, verified); its model document."""
        ...

    def spawn(self, req: SpawnRequest, token: str, on_event: Reporter | None = None) -> Doc:
        """Start a worker that serves with `token`; its worker record."""
        ...

    def stop(self, worker_id: str, timeout: float | None = None) -> Doc:
        """Stop one worker; the `stopped` document."""
        ...

    def stop_all(self, timeout: float | None = None) -> Doc:
        """Stop every worker of the host; `{"stopped": [...]}`."""
        ...

    def token(self, worker_id: str) -> str:
        """A worker's bearer token."""
        ...

    def logs(self, worker_id: str, lines: int = 50) -> list[str]:
        """The last lines of a worker's log."""
        ...

    def follow_logs(self, worker_id: str, on_line: Callable[[str], None],
                    lines: int = 50) -> None:
        """Pass each line of a worker's log on, new ones too, until the worker exits."""
        ...

    def command(self, args: Sequence[str], *, on_event: Reporter | None = None,
                secrets: dict[str, str] | None = None) -> Doc:
        """Any other `rbee-hive` command (`rbee pool <command> --host NAME`); its result."""
        ...

    def lend(self, device: str, *, cache_dir: str | None = None,
             bind: str | None = None) -> Doc:
        """Start an RPC lender of one device (`cpu:0`, `cuda:1`) on the host's loopback (or,
        with `bind`, on that address: unauthenticated, the user's explicit choice)."""
        ...

    def lenders(self) -> list[Doc]:
        """The host's RPC lenders (`rbee-hive rpc list`)."""
        ...

    def stop_lender(self, lender_id: str) -> Doc:
        """Stop one RPC lender."""
        ...

    def lines(self, args: Sequence[str], on_line: Callable[[str], None]) -> int:
        """A command whose output is lines (`--help`, `logs --follow`), passed on one by one;
        raises the error it reported, else returns its exit code."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...


def word(value: str, what: str) -> str:
    """A value for one of a hive command's positional arguments, as given: one that starts
    with "-" would be read as an option (a worker id "--all" would stop every worker)."""
    if value.startswith("-"):
        raise UsageError(f"{what} {value!r} is not valid: it starts with '-'",
                         hint=f"Give the {what} itself, as the hive lists it.")
    return value


class CommandHive:
    """A hive reached by running its CLI (`--format ndjson`) through a transport."""

    def __init__(self, host: HostConfig, transport: Transport) -> None:
        self.host = host
        self.transport = transport

    # the typed calls

    def status(self, timeout: float | None = None) -> Doc:
        return self._call(["status"], timeout=timeout)

    def workers(self, timeout: float | None = None) -> list[Doc]:
        return list(self._call(["worker", "list"], timeout=timeout)["workers"])

    def download(self, ref: str, *, model_id: str | None = None, sha256: str | None = None,
                 on_event: Reporter | None = None) -> Doc:
        args = ["models", "download", word(ref, "model reference")]
        if model_id:
            args += ["--id", model_id]
        if sha256:
            args += ["--sha256", sha256]
        return self._call(args, on_event=on_event)

    def spawn(self, req: SpawnRequest, token: str, on_event: Reporter | None = None) -> Doc:
        args = ["worker", "spawn", word(req.backend, "backend"), "--model",
                word(req.model, "model"), "--device", ",".join(str(d) for d in req.devices()),
                "--token-stdin"]
        for flag, value in (("--ctx", req.ctx), ("--port", req.port), ("--bind", req.bind),
                            ("--threads", req.threads), ("--timeout", req.timeout)):
            if value is not None:
                args += [flag, str(value)]
        if req.tensor_split:
            args += ["--tensor-split", ",".join(f"{p:g}" for p in req.tensor_split)]
        if req.rpc:
            args += ["--rpc", ",".join(req.rpc)]
        if not req.wait:
            args.append("--no-wait")
        return self._call(args, on_event=on_event, secrets={"token": token})

    def stop(self, worker_id: str, timeout: float | None = None) -> Doc:
        return self._call(["worker", "stop", word(worker_id, "worker id")], timeout=timeout)

    def lend(self, device: str, *, cache_dir: str | None = None,
             bind: str | None = None) -> Doc:
        args = ["rpc", "start", "--device", device]
        if cache_dir:
            args += ["--cache-dir", cache_dir]
        if bind:
            args += ["--bind", bind, "--insecure"]
        return self._call(args)

    def lenders(self) -> list[Doc]:
        return list(self._call(["rpc", "list"]).get("lenders", []))

    def stop_lender(self, lender_id: str) -> Doc:
        return self._call(["rpc", "stop", word(lender_id, "lender id")])

    def stop_all(self, timeout: float | None = None) -> Doc:
        return self._call(["worker", "stop", "--all"], timeout=timeout)

    def token(self, worker_id: str) -> str:
        return str(self._call(["worker", "token", word(worker_id, "worker id")])["token"])

    def logs(self, worker_id: str, lines: int = 50) -> list[str]:
        return list(self._call(["worker", "logs", word(worker_id, "worker id"), "--lines",
                                 str(lines)])["lines"])

    def follow_logs(self, worker_id: str, on_line: Callable[[str], None],
                    lines: int = 50) -> None:
        self.lines(["worker", "logs", word(worker_id, "worker id"), "--lines", str(lines),
                    "--follow", "--format", "ndjson"], on_line)

    def command(self, args: Sequence[str], *, on_event: Reporter | None = None,
                secrets: dict[str, str] | None = None) -> Doc:
        return self._call(list(args), on_event=on_event, secrets=secrets)

    def lines(self, args: Sequence[str], on_line: Callable[[str], None]) -> int:
        reply = self.transport.run(list(args), on_line=on_line)
        if reply.error is not None:
            self._result(reply)
        return reply.exit_code

    def close(self) -> None:
        self.transport.close()

    # how a command's reply becomes a document or an error

    def _call(self, args: list[str], *, on_event: Reporter | None = None,
              secrets: dict[str, str] | None = None, timeout: float | None = None) -> Doc:
        reply = self.transport.run([*args, "--format", "ndjson"], secrets=secrets,
                                   on_event=on_event, timeout=timeout)
        return self._result(reply)

    def _result(self, reply: HiveReply) -> Doc:
        name = self.host.name
        if reply.error is not None:
            err = RemoteError.from_envelope(reply.error, exit_code=reply.exit_code or 1)
            err.details.setdefault("host", name)
            raise err
        if reply.result is None:
            said = (reply.stderr.strip() or "\n".join(reply.stray)).strip()
            # what click says when a hive predates --stdin-json, ndjson or the command on
            # stdin: not any mention of them (a current hive's own usage errors name them)
            if any(old in said for old in ("No such option: --stdin-json",
                                           "'ndjson' is not one of", "Missing command")):
                raise SchemaMismatch(f"{name}: its rbee-hive is too old to talk to this rbee",
                                     hint=f"Install this rbee there: rbee hosts install {name} "
                                          "--upgrade")
            last = said.splitlines()[-1] if said else "no output"
            raise RbeeError(f"{name}: rbee-hive exited with status {reply.exit_code} and no "
                            f"result: {last}", host=name)
        return checked(name, reply.result)


def checked(name: str, doc: Doc) -> Doc:
    """A hive document, if it speaks this rbee's schema version; SCHEMA_MISMATCH if not."""
    version = schema_version(doc)
    if version != HIVE_SCHEMA_VERSION:
        raise SchemaMismatch(
            f"{name}: rbee-hive speaks schema v{version}, this rbee speaks "
            f"v{HIVE_SCHEMA_VERSION} ({doc.get('schema')!r})",
            hint=f"Install this rbee there: rbee hosts install {name} --upgrade",
            host=name, remote_schema=doc.get("schema"))
    return doc


class LocalHive(CommandHive):
    """The `transport = "local"` host: rbee-hive as a subprocess of this controller."""

    def __init__(self, host: HostConfig) -> None:
        super().__init__(host, LocalTransport(host))


class SshHive(CommandHive):
    """A host reached over SSH: rbee-hive run on one connection, reopened if it drops."""

    def __init__(self, host: HostConfig, accept_new_host_key: bool = False) -> None:
        super().__init__(host, SshTransport(host, accept_new_host_key))


class RoutedHive:
    """A host's hive through its pool daemon when this controller started one there
    (rbee_keeper.daemons) and it answers, else through its command transport (SSH or local).

    Chosen on every call, so a daemon that stops sends the next call over SSH and one that
    starts is used from the next call on, in a long-lived session too (the queen's). A call
    falls back only when nothing was done: the daemon could not be reached at all, or (for a
    read) it went away before answering. Commands without a typed call go over the command
    transport, where rbee-hive itself goes through the daemon when one runs.
    """

    def __init__(self, host: HostConfig, command: CommandHive) -> None:
        self.host = host
        self.command_hive = command
        self._http: Any = None
        self.last_route: str | None = None  # "daemon", "ssh" or "local": how the last call went

    def daemon(self) -> Any:
        """The HttpHive of the daemon this controller knows on the host, or None."""
        from rbee_keeper.daemons import lookup

        known = lookup(self.host.name)
        if known is None:
            return None
        http = self._http
        if http is None or (http.api.url, http.api.token) != (known.url.rstrip("/"),
                                                              known.token):
            from rbee_keeper.hive_http import HttpHive

            http = self._http = HttpHive(self.host, known.url, known.token)
        return http

    def _route(self, call: Callable[[HiveClient], T], read: bool = False) -> T:
        http = self.daemon()
        if http is not None:
            try:
                result = call(http)
                self.last_route = "daemon"
                return result
            except DaemonConnectionLost:
                if not read:
                    raise  # it may have done the work: do not do it twice
                log.info("%s: the pool daemon went away during a read; asking over %s",
                         self.host.name, self.host.transport)
            except DaemonUnreachable as e:
                log.info("%s: the pool daemon does not answer (%s); going over %s",
                         self.host.name, e.message, self.host.transport)
        result = call(self.command_hive)
        self.last_route = self.host.transport
        return result

    def status(self, timeout: float | None = None) -> Doc:
        return self._route(lambda h: h.status(timeout=timeout), read=True)

    def workers(self, timeout: float | None = None) -> list[Doc]:
        return self._route(lambda h: h.workers(timeout=timeout), read=True)

    def download(self, ref: str, *, model_id: str | None = None, sha256: str | None = None,
                 on_event: Reporter | None = None) -> Doc:
        return self._route(lambda h: h.download(ref, model_id=model_id, sha256=sha256,
                                                on_event=on_event))

    def spawn(self, req: SpawnRequest, token: str, on_event: Reporter | None = None) -> Doc:
        if req.rpc:  # a worker that borrows devices: the pool daemon does not start those
            return self.command_hive.spawn(req, token, on_event=on_event)
        return self._route(lambda h: h.spawn(req, token, on_event=on_event))

    def stop(self, worker_id: str, timeout: float | None = None) -> Doc:
        return self._route(lambda h: h.stop(worker_id, timeout=timeout))

    def stop_all(self, timeout: float | None = None) -> Doc:
        return self._route(lambda h: h.stop_all(timeout=timeout))

    def token(self, worker_id: str) -> str:
        return self._route(lambda h: h.token(worker_id), read=True)

    def logs(self, worker_id: str, lines: int = 50) -> list[str]:
        return self._route(lambda h: h.logs(worker_id, lines), read=True)

    def follow_logs(self, worker_id: str, on_line: Callable[[str], None],
                    lines: int = 50) -> None:
        self._route(lambda h: h.follow_logs(worker_id, on_line, lines))

    def command(self, args: Sequence[str], *, on_event: Reporter | None = None,
                secrets: dict[str, str] | None = None) -> Doc:
        return self.command_hive.command(args, on_event=on_event, secrets=secrets)

    def lines(self, args: Sequence[str], on_line: Callable[[str], None]) -> int:
        return self.command_hive.lines(args, on_line)

    # lenders are started and stopped over the command transport: the pool daemon does not
    # manage them (their tunnels ride on this controller's SSH connection anyway)
    def lend(self, device: str, *, cache_dir: str | None = None,
             bind: str | None = None) -> Doc:
        return self.command_hive.lend(device, cache_dir=cache_dir, bind=bind)

    def lenders(self) -> list[Doc]:
        return self.command_hive.lenders()

    def stop_lender(self, lender_id: str) -> Doc:
        return self.command_hive.stop_lender(lender_id)

    def close(self) -> None:
        self.command_hive.close()


def command_hive(host: HostConfig, accept_new_host_key: bool = False) -> CommandHive:
    """The host's hive by its command transport only (SSH or local), never its daemon."""
    if host.transport == "local":
        return LocalHive(host)
    return SshHive(host, accept_new_host_key)


def make_hive(host: HostConfig, accept_new_host_key: bool = False) -> HiveClient:
    """The client of a host's hive: its pool daemon when it has one, else SSH or local."""
    return RoutedHive(host, command_hive(host, accept_new_host_key))


class Session:
    """The hive clients of one rbee invocation (or one queen job): one per host, closed at
    the end."""

    def __init__(self, accept_new_host_key: bool = False,
                 factory: Callable[[HostConfig, bool], HiveClient] = make_hive) -> None:
        self.accept_new = accept_new_host_key
        self._factory = factory
        self._hives: dict[str, HiveClient] = {}
        self._lock = threading.Lock()

    def hive(self, host: HostConfig) -> HiveClient:
        with self._lock:
            if host.name not in self._hives:
                self._hives[host.name] = self._factory(host, self.accept_new)
            return self._hives[host.name]

    def close(self) -> None:
        for hive in self._hives.values():
            hive.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
