"""How the controller runs `rbee-hive` on a host: a local subprocess, or a command over SSH.

Both speak the same thing: `rbee-hive … --format ndjson`, progress events then one result
(or error) line. Over SSH, the host's env and any secret (a worker token) travel as one JSON
line on stdin (`--stdin-json`), never on the remote command line where `ps` would show them.
One SSH connection per host is opened per invocation and reused by all its commands.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rbee_common.errors import RbeeError
from rbee_common.names import PROGRESS_EVENTS
from rbee_common.progress import Reporter
from rbee_keeper.errors import (
    HiveNotInstalled,
    HostKeyMismatch,
    HostKeyUnknown,
    HostUnreachable,
    RemoteKilled,
    SshAuthFailed,
)
from rbee_keeper.hosts import HostConfig

log = logging.getLogger("rbee.keeper.transport")

CONNECT_ATTEMPTS = 2


@dataclass
class HiveReply:
    exit_code: int = 0
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    stderr: str = ""
    stray: list[str] = field(default_factory=list)

    def consume(self, line: str, on_event: Reporter | None,
                on_line: Callable[[str], None] | None) -> None:
        line = line.rstrip("\r\n")
        if not line:
            return
        try:
            doc = json.loads(line)
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or "event" not in doc:
            if on_line is not None:
                on_line(line)
            else:
                self.stray.append(line)  # e.g. a login banner printed by a shell rc file
            return
        kind = doc["event"]
        if kind == "result":
            self.result = doc.get("result")
        elif kind == "error":
            self.error = doc
        elif kind == "line" and on_line is not None:
            on_line(str(doc.get("line", "")))
        elif kind in PROGRESS_EVENTS and on_event is not None:
            on_event(doc)


def _drain(stream: Any, sink: list[bytes]) -> threading.Thread:
    def run() -> None:
        # a command that timed out or whose connection broke: the reader reports it
        with contextlib.suppress(OSError, EOFError):
            sink.append(stream.read())

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


INTERRUPT_GRACE = 30.0  # how long a Ctrl+C'd hive may take to finish (stop a loading worker)


def _interrupted(proc: subprocess.Popen[bytes], reply: HiveReply, on_event: Reporter | None,
                 on_line: Callable[[str], None] | None) -> None:
    """Ctrl+C while the hive works: hand it the Ctrl+C, so it ends as it would at a terminal
    (a download keeps its bytes, a loading worker is stopped), and read what it says. Its
    error (CANCELLED, with what it did) is the reply; without one, the interrupt goes on. A
    second Ctrl+C stops waiting; the caller's `finally` kills the hive then."""
    import signal

    proc.send_signal(signal.SIGINT)
    assert proc.stdout is not None
    killer = threading.Timer(INTERRUPT_GRACE, proc.kill)
    killer.daemon = True
    killer.start()
    try:
        for raw in proc.stdout:
            reply.consume(raw.decode("utf-8", errors="replace"), on_event, on_line)
    finally:
        killer.cancel()
    if reply.error is None:
        raise KeyboardInterrupt


ACK = b"ack\n"  # what a controller writes once it has read a hive command's answer
SETTLE_GRACE = 15.0  # seconds a local hive has to end after its stdin closed early


class LocalTransport:
    """rbee-hive as a subprocess of this controller: the `transport = "local"` host."""

    def __init__(self, host: HostConfig) -> None:
        self.host = host

    def argv(self) -> list[str]:
        hive = [os.path.expanduser(a) for a in self.host.hive_argv()]
        sibling = Path(sys.executable).parent / "rbee-hive"
        if hive == ["rbee-hive"] and sibling.exists():
            hive = [str(sibling)]  # the hive of this very installation
        return hive

    def run(self, args: list[str], *, secrets: dict[str, str] | None = None,
            on_event: Reporter | None = None, on_line: Callable[[str], None] | None = None,
            timeout: float | None = None) -> HiveReply:
        # the settings on stdin, which stays open while we read: however this controller
        # ends (a signal it cannot handle, a thread that never sees the Ctrl+C), the hive's
        # stdin closes and it ends as a Ctrl+C would, as over SSH
        argv = [*self.argv(), "--stdin-json", *args]
        preamble = json.dumps({"env": {}, "watch_stdin": True, "acks": True,
                               **(secrets or {})}) + "\n"
        env = {**os.environ, **self.host.env}
        try:
            # a process group of its own: a terminal's Ctrl+C reaches this controller alone,
            # which hands the hive exactly one (see _interrupted)
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=env, process_group=0)
        except FileNotFoundError as e:
            raise HiveNotInstalled(f"{argv[0]!r} not found on this machine",
                                   hint="Install rbee here, or set hive = \"/path/to/rbee-hive\" "
                                        "for localhost in hosts.toml.") from e
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        reply = HiveReply()
        # the deadline covers the whole command, not just the wait after stdout closes
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            proc.kill()

        timer = threading.Timer(timeout, expire) if timeout else None
        err: list[bytes] = []
        drainer = None
        try:
            with contextlib.suppress(OSError):  # it exited without reading: its output says why
                proc.stdin.write(preamble.encode())
                proc.stdin.flush()
            drainer = _drain(proc.stderr, err)
            if timer is not None:
                timer.daemon = True
                timer.start()
            try:
                acked = False
                for raw in proc.stdout:
                    reply.consume(raw.decode("utf-8", errors="replace"), on_event, on_line)
                    if not acked and reply.result is not None:
                        acked = True
                        with contextlib.suppress(OSError):
                            proc.stdin.write(ACK)
                            proc.stdin.flush()
            except KeyboardInterrupt:
                _interrupted(proc, reply, on_event, on_line)
            with contextlib.suppress(OSError):  # its answer is complete: we are done with it
                proc.stdin.close()
            reply.exit_code = proc.wait()
        finally:
            if timer is not None:
                timer.cancel()
            with contextlib.suppress(OSError):
                proc.stdin.close()
            if proc.poll() is None and not expired.is_set():
                # its stdin closed: it ends as a Ctrl+C would, undoing what we never learnt of
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=SETTLE_GRACE)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if drainer is not None:
            drainer.join(timeout=5)
        reply.stderr = b"".join(err).decode("utf-8", errors="replace")
        if expired.is_set() and reply.result is None and reply.error is None:
            raise HostUnreachable(f"{self.host.name}: rbee-hive gave no answer within "
                                  f"{timeout:g}s; stopped it")
        return reply

    def run_command(self, command: str, stdin: bytes = b"", *,
                    on_event: Reporter | None = None,
                    on_line: Callable[[str], None] | None = None) -> HiveReply:
        """A shell command line (not rbee-hive) whose stdout speaks rbee's ndjson, as on a
        remote host: what it must know (env, secrets, files) goes in `stdin`, never argv."""
        proc = subprocess.Popen(["sh", "-c", command], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None

        def feed(pipe: Any) -> None:
            try:
                pipe.write(stdin)
                pipe.close()
            except OSError:
                pass  # it exited without reading: its output says why

        writer = threading.Thread(target=feed, args=(proc.stdin,), daemon=True)
        writer.start()
        err: list[bytes] = []
        drainer = _drain(proc.stderr, err)
        reply = HiveReply()
        try:
            for raw in proc.stdout:
                reply.consume(raw.decode("utf-8", errors="replace"), on_event, on_line)
            reply.exit_code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        writer.join(timeout=5)
        drainer.join(timeout=5)
        reply.stderr = b"".join(err).decode("utf-8", errors="replace")
        return reply

    def close(self) -> None:
        pass


def fingerprint(key: Any) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_hosts_name(hostname: str, port: int) -> str:
    """How OpenSSH (and paramiko) name a host in known_hosts: `[host]:port` off port 22."""
    return hostname if port == 22 else f"[{hostname}]:{port}"


def _known_hosts_file(ssh_config: dict[str, Any]) -> Path:
    configured = ssh_config.get("userknownhostsfile")
    if isinstance(configured, list):
        configured = configured[0] if configured else None
    if configured:
        return Path(os.path.expanduser(str(configured).split()[0]))
    return Path("~/.ssh/known_hosts").expanduser()


def _host_key_policy(accept_new: bool, known_hosts: Path) -> Any:
    import paramiko

    class Policy(paramiko.MissingHostKeyPolicy):
        """Refuse unknown keys (OpenSSH's default), or add them with the opt-in (accept-new)."""

        def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
            fp = fingerprint(key)
            if not accept_new:
                raise HostKeyUnknown(
                    f"the SSH host key of {hostname} ({key.get_name()} {fp}) is not in "
                    f"{known_hosts}",
                    hint="Check the fingerprint, then run `rbee hosts check NAME "
                         "--accept-new-host-key` (or `ssh` to the host once).",
                    fingerprint=fp)
            client.get_host_keys().add(hostname, key.get_name(), key)
            known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(known_hosts, "a") as f:
                f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
            log.info("added %s key %s of %s to %s", key.get_name(), fp, hostname, known_hosts)

    return Policy()


def _harden(conn: Any, accept_new: bool) -> None:
    """Replace fabric's accept-any-key policy on this connection and every ProxyJump hop."""
    known = _known_hosts_file(dict(conn.ssh_config))
    client = conn.client
    system = Path("/etc/ssh/ssh_known_hosts")
    if system.is_file():
        client.load_system_host_keys(str(system))
    if known.is_file():
        client.load_system_host_keys(str(known))
    client.set_missing_host_key_policy(_host_key_policy(accept_new, known))
    gateway = getattr(conn, "gateway", None)
    if gateway is not None and not isinstance(gateway, str):
        _harden(gateway, accept_new)


def _quiet_paramiko() -> None:
    """paramiko logs its transport thread's failures (with tracebacks) to stderr through the
    root logger: rbee reports them as coded errors instead; RBEE_DEBUG=1 keeps them."""
    if os.environ.get("RBEE_DEBUG") == "1":
        return
    plog = logging.getLogger("paramiko")
    if not plog.handlers:
        plog.addHandler(logging.NullHandler())
    plog.propagate = False


def _remote_command(host: HostConfig) -> str:
    """The remote command line, the same for every command: the host's hive (from hosts.toml;
    a leading ~/ still means the home dir) and `--stdin-json`. The command's own words (model
    references, worker ids, URLs) travel on stdin, so none of them meets the host's login
    shell, whichever it is: fish reads backslashes inside single quotes, csh refuses newlines.
    """
    hive = host.hive_argv()
    first = hive[0]
    head = '"$HOME"/' + shlex.quote(first[2:]) if first.startswith("~/") else shlex.quote(first)
    return " ".join([head, *(shlex.quote(a) for a in [*hive[1:], "--stdin-json"])])


class SshTransport:
    """rbee-hive run over one SSH connection (opened on first use, reused after)."""

    def __init__(self, host: HostConfig, accept_new: bool = False) -> None:
        self.host = host
        self.accept_new = accept_new or host.strict_host_key_checking == "accept-new"
        self._conn: Any = None
        self._lock = threading.Lock()

    def _connect(self) -> Any:
        with self._lock:
            if self._conn is not None:
                transport = self._conn.transport
                if transport is not None and transport.is_active():
                    return self._conn
                log.info("%s: the SSH connection dropped; reconnecting", self.host.name)
                self._conn.close()
                self._conn = None
            from fabric import Connection

            _quiet_paramiko()
            target, user, port = self.host.ssh_target()
            timeout = self.host.connect_timeout
            last: RbeeError | None = None
            for attempt in range(CONNECT_ATTEMPTS):
                conn = Connection(target, user=user, port=port, connect_timeout=timeout,
                                  connect_kwargs={"banner_timeout": timeout,
                                                  "auth_timeout": timeout})
                ssh_says = str(conn.ssh_config.get("stricthostkeychecking", "")).lower()
                _harden(conn, self.accept_new or ssh_says in ("accept-new", "no", "off"))
                try:
                    conn.open()
                    self._conn = conn
                    return conn
                except RbeeError:
                    raise  # host key policy: no retry
                except Exception as e:
                    last = self._map_error(e, target, conn.port,
                                           _known_hosts_file(dict(conn.ssh_config)), conn.host)
                    conn.close()
                    if not isinstance(last, HostUnreachable):
                        raise last from e
                if attempt + 1 < CONNECT_ATTEMPTS:
                    time.sleep(0.3 * (attempt + 1))
            assert last is not None
            raise last

    def paramiko_transport(self) -> Any:
        """The live paramiko Transport of this host's connection (for port forwarding)."""
        return self._connect().transport

    def _map_error(self, e: Exception, target: str, port: int, known_hosts: Path,
                   hostname: str) -> RbeeError:
        import paramiko

        where = f"{self.host.name} ({target}:{port})"
        if isinstance(e, paramiko.BadHostKeyException):
            # the name its line has in known_hosts (a ProxyJump hop is reached on port 22
            # unless its own config says otherwise: name the host alone then)
            name = known_hosts_name(e.hostname, port if e.hostname == hostname else 22)
            return HostKeyMismatch(
                f"the SSH host key of {where} has CHANGED: expected "
                f"{fingerprint(e.expected_key)}, got {fingerprint(e.key)}",
                hint="If the host was reinstalled, remove its old key with `ssh-keygen -f "
                     f"{shlex.quote(str(known_hosts))} -R {shlex.quote(name)}`; otherwise do "
                     "not connect.", known_hosts=str(known_hosts), known_hosts_name=name)
        if isinstance(e, paramiko.AuthenticationException):
            return SshAuthFailed(f"{where} refused our SSH keys: {e}")
        if isinstance(e, socket.gaierror):
            return HostUnreachable(f"cannot resolve {target}: {e.strerror}")
        if isinstance(e, TimeoutError | socket.timeout):
            return HostUnreachable(f"{where}: no answer within {self.host.connect_timeout:g}s")
        if isinstance(e, paramiko.ssh_exception.NoValidConnectionsError):
            return HostUnreachable(f"{where}: connection refused")
        said = str(e)
        if "protocol banner" in said or "No existing session" in said:
            # paramiko reports a server that accepts TCP and says nothing as "no session"
            return HostUnreachable(
                f"{where}: accepted the connection but did not speak SSH within "
                f"{self.host.connect_timeout:g}s",
                hint="Is that port an SSH server? Check the port in hosts.toml (ssh = "
                     "\"user@host:port\") and try `ssh -p PORT host` by hand.")
        if isinstance(e, paramiko.SSHException | OSError | EOFError):
            return HostUnreachable(f"{where}: SSH failed: {e or type(e).__name__}")
        return HostUnreachable(f"{where}: {type(e).__name__}: {e}")

    def _open_channel(self) -> Any:
        """A session channel; a connection that died since its last use is reopened once."""
        import paramiko

        for attempt in (1, 2):
            conn = self._connect()
            try:
                return conn.transport.open_session(timeout=self.host.connect_timeout)
            except (paramiko.SSHException, OSError, EOFError) as e:
                with self._lock:
                    if self._conn is conn:
                        conn.close()
                        self._conn = None
                if attempt == 2:
                    raise HostUnreachable(f"{self.host.name}: cannot open an SSH session: "
                                          f"{e or type(e).__name__}") from e
        raise AssertionError("unreachable")

    def run(self, args: list[str], *, secrets: dict[str, str] | None = None,
            on_event: Reporter | None = None, on_line: Callable[[str], None] | None = None,
            timeout: float | None = None) -> HiveReply:
        command = _remote_command(self.host)
        log.debug("%s$ %s %s", self.host.name, command, shlex.join(args))
        chan = self._open_channel()
        try:
            chan.settimeout(timeout)
            chan.exec_command(command)
            # stdin stays open while we wait: the hive ends itself when it closes (we gave
            # up, or the connection dropped), rather than running on unseen
            chan.sendall((json.dumps({"env": self.host.env, "watch_stdin": True, "acks": True,
                                      **(secrets or {}), "argv": args}) + "\n").encode())
            reply = self._read(chan, on_event, on_line, "rbee-hive", ack=True)
        except TimeoutError as e:
            raise HostUnreachable(f"{self.host.name}: rbee-hive gave no answer within "
                                  f"{timeout:g}s; stopped it") from e
        except (OSError, EOFError) as e:
            raise HostUnreachable(f"{self.host.name}: the SSH connection broke: {e}") from e
        finally:
            chan.close()  # the remote hive sees its stdin close and ends (Ctrl+C, timeout)
        if reply.exit_code in (126, 127) and reply.result is None and reply.error is None:
            first = (reply.stderr.strip().splitlines() or [""])[-1]
            raise HiveNotInstalled(
                f"{self.host.name}: could not run {self.host.hive!r} ({first or 'not found'})",
                hint=f"Install it: rbee hosts install {self.host.name}; or set hive = "
                     f"\"/full/path/to/rbee-hive\" under [hosts.{self.host.name}] in hosts.toml "
                     "(a non-interactive SSH session may not have your PATH).")
        return reply

    def run_command(self, command: str, stdin: bytes = b"", *,
                    on_event: Reporter | None = None,
                    on_line: Callable[[str], None] | None = None) -> HiveReply:
        """A command line (not rbee-hive) run by the host's login shell on this connection,
        its stdout read as rbee's ndjson: what it must know (env, secrets, files) goes in
        `stdin`, never on the command line, where `ps` shows it."""
        log.debug("%s$ %s", self.host.name, command[:200])
        chan = self._open_channel()
        try:
            chan.exec_command(command)
            with contextlib.suppress(OSError):  # it exited without reading: its output says why
                chan.sendall(stdin)
                chan.shutdown_write()
            return self._read(chan, on_event, on_line, "the command")
        except (OSError, EOFError) as e:
            raise HostUnreachable(f"{self.host.name}: the SSH connection broke: {e}") from e
        finally:
            chan.close()

    def _read(self, chan: Any, on_event: Reporter | None,
              on_line: Callable[[str], None] | None, what: str,
              ack: bool = False) -> HiveReply:
        """A command's ndjson stdout, its stderr and exit status; a connection that goes away
        meanwhile is HOST_UNREACHABLE. With `ack`, the answer is acknowledged as it arrives
        (see rbee_hive.preamble)."""
        err: list[bytes] = []
        try:
            drainer = _drain(chan.makefile_stderr("rb"), err)
            reply = HiveReply()
            for raw in chan.makefile("rb"):
                reply.consume(raw.decode("utf-8", errors="replace"), on_event, on_line)
                if ack and reply.result is not None:
                    ack = False
                    chan.sendall(ACK)
            reply.exit_code = chan.recv_exit_status()
            drainer.join(timeout=5)
        except TimeoutError:
            raise
        except (OSError, EOFError) as e:
            raise HostUnreachable(f"{self.host.name}: the SSH connection broke: {e}") from e
        reply.stderr = b"".join(err).decode("utf-8", errors="replace")
        if reply.exit_code == -1 and reply.result is None and reply.error is None:
            # paramiko's "no exit status": the connection went away while the command ran,
            # or the command was killed by a signal (paramiko drops SSH's exit-signal)
            transport = chan.get_transport()
            if transport is not None and transport.is_active():
                tail = " | ".join(reply.stderr.strip().splitlines()[-3:])
                raise RemoteKilled(
                    f"{self.host.name}: {what} ended without an exit status "
                    f"(killed by a signal?) while the SSH connection stayed up"
                    + (f"; it said: {tail}" if tail else ""),
                    hint="Try again; if it repeats, run the same rbee-hive command on the "
                         f"host by hand (ssh {self.host.name} …) to see why it ends.",
                    stderr_tail=tail)
            raise HostUnreachable(f"{self.host.name}: the SSH connection broke while {what} "
                                  "was running")
        return reply

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


Transport = LocalTransport | SshTransport
