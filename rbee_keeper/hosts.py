"""hosts.toml: the hosts of the pool (DESIGN.md §2).

With no hosts.toml, the pool is one host: `localhost`, run as a subprocess (no SSH).
`add` and `rm` edit the file's text, so the user's comments and layout survive.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rbee_common.config import load_toml, toml_string, validate
from rbee_common.errors import ConfigInvalid, UsageError
from rbee_common.files import atomic_write_bytes, locked
from rbee_keeper.errors import UnknownHost
from rbee_keeper.hostsfile import IMPLICIT, hosts_path

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ENV_RE = r"^[A-Za-z_][A-Za-z0-9_]*$"
# a host's env may hold secrets (HF_TOKEN): the file is the user's alone
HOSTS_MODE = 0o600
_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # no NUL, newline or other controls


class HostConfig(BaseModel):
    """One `[hosts.NAME]` table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = ""
    transport: Literal["local", "ssh"] = "ssh"
    ssh: str | None = Field(default=None, pattern=r"^[^\s'\"`$;&|<>]+$")
    hive: str = "rbee-hive"
    env: dict[str, str] = {}
    address: str | None = None
    bind: str | None = None
    connect_timeout: float = Field(default=5.0, gt=0, le=120)
    strict_host_key_checking: Literal["yes", "accept-new"] = "yes"

    @model_validator(mode="after")
    def _needs_ssh(self) -> HostConfig:
        if self.transport == "ssh" and not self.ssh:
            raise ValueError("an ssh host needs ssh = \"user@host[:port]\" (or an ssh alias)")
        return self

    @field_validator("ssh")
    @classmethod
    def _ssh(cls, ssh: str | None) -> str | None:
        if ssh is not None:
            cls._parse_ssh(ssh)
        return ssh

    @field_validator("hive")
    @classmethod
    def _hive(cls, hive: str) -> str:
        try:
            words = shlex.split(hive)
        except ValueError as e:
            raise ValueError(f"{hive!r} cannot be split into words: {e}") from e
        if not words or any(_UNSAFE.search(w) for w in words):
            raise ValueError(f"{hive!r}: give the rbee-hive command (a path, maybe with "
                             "arguments), without control characters")
        return hive

    @field_validator("env")
    @classmethod
    def _env(cls, env: dict[str, str]) -> dict[str, str]:
        for key, value in env.items():
            if not re.match(ENV_RE, key):
                raise ValueError(f"{key!r} is not a variable name")
            if _UNSAFE.search(value) or len(value) > 8192:
                raise ValueError(f"{key} holds control characters or is too long")
        return env

    @field_validator("address", "bind")
    @classmethod
    def _where(cls, value: str | None) -> str | None:
        if value is not None and (not value or re.search(r"[\s\x00-\x1f]", value)):
            raise ValueError(f"{value!r} is not a host name or address")
        return value

    @staticmethod
    def _parse_ssh(ssh: str) -> tuple[str, str | None, int | None]:
        user, at, rest = ssh.rpartition("@")
        if at and not user:
            raise ValueError(f"{ssh!r}: the user before @ is empty")
        host, port = rest, None
        if rest.startswith("["):  # [ipv6]:port
            host, _, tail = rest[1:].partition("]")
            port = tail[1:] if tail.startswith(":") else None
        elif rest.count(":") == 1:
            host, port = rest.split(":")
        if not host:
            raise ValueError(f"{ssh!r}: the host is empty")
        if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"{ssh!r}: the port must be a number from 1 to 65535")
        return host, user or None, int(port) if port is not None else None

    def ssh_target(self) -> tuple[str, str | None, int | None]:
        """(host, user, port) from `ssh = "user@host:port"`; None where not given."""
        assert self.ssh
        return self._parse_ssh(self.ssh)

    def worker_address(self) -> str:
        """Where the controller reaches this host's workers."""
        if self.address:
            return self.address
        if self.transport == "local":
            return "127.0.0.1"
        return self.ssh_target()[0]

    def worker_url(self, port: int) -> str:
        """The URL of this host's worker on `port`, as the controller reaches it."""
        address = self.worker_address()
        return f"http://[{address}]:{port}" if ":" in address else f"http://{address}:{port}"

    def worker_bind(self) -> str:
        """What workers listen on: `bind`, else the address when it is an IP, else all."""
        if self.bind:
            return self.bind
        address = self.worker_address()
        try:
            ipaddress.ip_address(address)
            return address
        except ValueError:
            return "0.0.0.0"

    def hive_argv(self) -> list[str]:
        return shlex.split(self.hive)


class HostsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hosts: dict[str, HostConfig] = {}


DEFAULT_HOSTS = {IMPLICIT: HostConfig(name=IMPLICIT, transport="local")}


def load_hosts() -> dict[str, HostConfig]:
    """The hosts of hosts.toml, or the implicit `localhost` when there is no file."""
    path = hosts_path()
    if not path.is_file():
        return dict(DEFAULT_HOSTS)
    data, text = load_toml(path)
    parsed = validate(HostsFile, data, path, text)
    hosts = {}
    for name, host in parsed.hosts.items():
        if not NAME_RE.match(name):
            raise ConfigInvalid(f"{path}: host name {name!r} may use letters, digits, . _ -",
                                file=str(path))
        hosts[name] = host.model_copy(update={"name": name})
    return hosts


def get_host(name: str, hosts: dict[str, HostConfig] | None = None) -> HostConfig:
    hosts = load_hosts() if hosts is None else hosts
    if name not in hosts:
        known = ", ".join(sorted(hosts)) or "none"
        raise UnknownHost(f"no host {name!r} in {hosts_path()} (known: {known})")
    return hosts[name]


def select(names: list[str] | None) -> dict[str, HostConfig]:
    hosts = load_hosts()
    if not names:
        return hosts
    return {n: get_host(n, hosts) for n in names}


def _section_header(name: str) -> re.Pattern[str]:
    return re.compile(rf'^\s*\[\s*hosts\s*\.\s*(?:{re.escape(name)}|"{re.escape(name)}")\s*\]')


def new_host(name: str, *, ssh: str | None, local: bool, hive: str, address: str | None,
             env: list[str]) -> HostConfig:
    """A host from command-line options (`rbee hosts add`); USAGE for anything invalid."""
    from pydantic import ValidationError

    if local == (ssh is not None):
        raise UsageError("give --ssh USER@HOST or --local (one of them)")
    pairs = {}
    for item in env:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--env {item!r}: write KEY=VALUE")
        pairs[key] = value
    try:
        return HostConfig(name=name, transport="local" if local else "ssh", ssh=ssh, hive=hive,
                          address=address, env=pairs)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "host"
        raise UsageError(f"invalid host: {field}: "
                         f"{str(first['msg']).removeprefix('Value error, ')}") from e


def hosts_document() -> dict[str, Any]:
    """The `rbee.hosts/v1` document: every host of hosts.toml (env values never shown)."""
    path = hosts_path()
    hosts = [{"name": h.name, "transport": h.transport, "ssh": h.ssh, "hive": h.hive,
              "address": h.worker_address(), "bind": h.worker_bind(),
              "env_keys": sorted(h.env)} for h in load_hosts().values()]
    return {"schema": "rbee.hosts/v1", "file": str(path), "exists": path.is_file(),
            "hosts": hosts}


def _changed(action: str, name: str, path: Path) -> dict[str, Any]:
    return {"schema": "rbee.hosts.changed/v1", "action": action, "name": name, "file": str(path)}


def add_host(name: str, host: HostConfig) -> dict[str, Any]:
    """Append a host to hosts.toml (created with the implicit localhost kept)."""
    if not NAME_RE.match(name):
        raise UsageError(f"{name!r} is not a valid host name", hint="Use letters, digits, . _ -")
    path = hosts_path()
    with locked(path.with_suffix(".lock")):
        if name in load_hosts() and path.is_file():
            raise UsageError(f"host {name!r} is already in {path}",
                             hint=f"Remove it first: rbee hosts rm {name}")
        # a new file keeps the controller's own machine in the pool, as it was implicitly
        text = path.read_text() if path.is_file() else (
            "# rbee hosts — see `rbee hosts --help`\n\n"
            "[hosts.localhost]\ntransport = \"local\"\n")
        lines = [f"\n[hosts.{name}]"]
        if host.transport == "local":
            lines.append('transport = "local"')
        else:
            lines.append(f"ssh = {toml_string(host.ssh or '')}")
        if host.hive != "rbee-hive":
            lines.append(f"hive = {toml_string(host.hive)}")
        if host.address:
            lines.append(f"address = {toml_string(host.address)}")
        if host.env:
            pairs = ", ".join(f"{k} = {toml_string(v)}" for k, v in host.env.items())
            lines.append(f"env = {{ {pairs} }}")
        new = text.rstrip("\n") + "\n" + "\n".join(lines) + "\n"
        _write_or_restore(path, new, text if path.is_file() else None,
                          lambda: load_hosts()[name])
    return _changed("add", name, path)


def _write_or_restore(path: Path, new: str, old: str | None, check: Callable[[], Any]) -> None:
    """Write hosts.toml, then `check` that it reads back; if it does not, put back what was
    there (or nothing) and raise: a failed edit never leaves a file every command refuses."""
    atomic_write_bytes(path, new.encode(), mode=HOSTS_MODE)
    try:
        check()
    except Exception:
        if old is None:
            path.unlink(missing_ok=True)
        else:
            atomic_write_bytes(path, old.encode(), mode=HOSTS_MODE)
        raise


def remove_host(name: str) -> dict[str, Any]:
    """Remove a host's table from hosts.toml; comments and other hosts stay as they are."""
    path = hosts_path()
    with locked(path.with_suffix(".lock")):
        get_host(name)
        if not path.is_file():
            raise UsageError("the implicit localhost cannot be removed; there is no hosts.toml")
        lines = path.read_text().splitlines(keepends=True)
        header = _section_header(name)
        start = next(i for i, line in enumerate(lines) if header.match(line))
        end = next((i for i in range(start + 1, len(lines))
                    if re.match(r"^\s*\[", lines[i])), len(lines))
        # comments just above the next header belong to that header: keep them
        while end > start + 1 and (not lines[end - 1].strip()
                                   or lines[end - 1].lstrip().startswith("#")):
            end -= 1
        atomic_write_bytes(path, "".join(lines[:start] + lines[end:]).encode(), mode=HOSTS_MODE)
    return _changed("rm", name, path)


def _assignment(key: str) -> re.Pattern[str]:
    """`key = "…"` or `key = '…'`, with whatever follows the value (a comment) kept apart."""
    return re.compile(rf"""^(\s*{re.escape(key)}\s*=\s*)("(?:[^"\\]|\\.)*"|'[^']*')(.*)$""",
                      re.DOTALL)


def set_hive(name: str, hive: str) -> bool:
    """Point a host's `hive` at `hive` in hosts.toml, editing only that line (its comment
    stays) or adding it under the table's header; False when it was already so."""
    path = hosts_path()
    with locked(path.with_suffix(".lock")):
        current = get_host(name)
        if current.hive == hive:
            return False
        validate(HostConfig, {**current.model_dump(exclude_unset=True), "hive": hive}, path, "")
        if not path.is_file():
            raise UsageError(f"{name} is not in a hosts.toml", hint="Add it: rbee hosts add")
        text = path.read_text()
        lines = text.splitlines(keepends=True)
        start = next(i for i, line in enumerate(lines) if _section_header(name).match(line))
        end = next((i for i in range(start + 1, len(lines))
                    if re.match(r"^\s*\[", lines[i])), len(lines))
        pattern = _assignment("hive")
        for i in range(start + 1, end):
            m = pattern.match(lines[i])
            if m:
                lines[i] = m.group(1) + toml_string(hive) + m.group(3)
                break
        else:
            lines.insert(start + 1, f"hive = {toml_string(hive)}\n")
        def check() -> None:
            if get_host(name).hive != hive:  # a layout this edit does not understand
                raise ConfigInvalid(f"{path}: could not set hive for {name}",
                                    hint=f"Set it by hand under [hosts.{name}]: "
                                         f"hive = {toml_string(hive)}", file=str(path))

        _write_or_restore(path, "".join(lines), text, check)
    return True
