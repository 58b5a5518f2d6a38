"""`rbee hosts install`: from a bare machine to a pool member, over the SSH rbee already has.

The controller builds a wheel of its own checkout (rbee_keeper.wheel) and sends it, with the
program in rbee_keeper/install_host.py and the host's env, over one SSH session's stdin —
secrets never travel on a command line. That program checks the host, creates a venv under
the prefix, installs rbee with llama-cpp-python built for the host's backend, and streams its
progress here. Then the host's `hive` in hosts.toml points at the installed rbee-hive, and the
same preflight as `rbee hosts check` runs against it. Several hosts install in parallel, each
with its own result.
"""

from __future__ import annotations

import json
import shlex
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rbee_common.config import validate
from rbee_common.errors import RemoteError, UsageError
from rbee_common.names import BACKENDS
from rbee_common.progress import Reporter, null_reporter
from rbee_hive.schemas import HIVE_SCHEMA_VERSION
from rbee_keeper.errors import InstallFailed, UnknownHost
from rbee_keeper.fanout import fan_out, overall
from rbee_keeper.hosts import HostConfig, add_host, get_host, load_hosts, new_host, set_hive
from rbee_keeper.hostsfile import hosts_path
from rbee_keeper.wheel import Wheel, build_wheel

Doc = dict[str, Any]

INSTALL = "rbee.hosts.install/v1"
BACKEND_CHOICES = ("auto", *BACKENDS)
INSTALL_TIMEOUT = 4 * 3600.0  # a CUDA build on a small machine takes a long while
PROGRAM = Path(__file__).with_name("install_host.py")

# Run by the host's login shell. It finds a Python (the system's python3 first, then the
# newest versioned one; an older one only to say what is wrong) and hands it the loader,
# which reads the rest from stdin. Constant text: nothing of the host or the user is in it,
# and no backslash (fish reads those inside single quotes).
NO_PYTHON = {"event": "error", "exit_code": 1, "error": {
    "code": "PREFLIGHT_FAILED", "message": "no Python 3 on the PATH of a non-interactive SSH "
    "session", "details": {}, "hint": "Install Python 3.11 or newer with its venv module "
    "(Debian/Ubuntu: sudo apt-get install -y python3 python3-venv; macOS: brew install "
    "python@3.12). Nothing was changed."}}
BOOTSTRAP = f"""\
for p in python3 python3.14 python3.13 python3.12 python3.11; do
  if command -v "$p" >/dev/null 2>&1 &&
     "$p" -c "import sys; sys.exit(sys.version_info < (3, 11))" >/dev/null 2>&1; then
    exec "$p" -c "$1"
  fi
done
for p in python3; do
  if command -v "$p" >/dev/null 2>&1 &&
     "$p" -c "import sys; sys.exit(sys.version_info < (3, 7))" >/dev/null 2>&1; then
    exec "$p" -c "$1"
  fi
done
echo {shlex.quote(json.dumps(NO_PYTHON))}
exit 1
"""
LOADER = ('import json, sys; h = json.loads(sys.stdin.buffer.readline()); '
          'exec(compile(sys.stdin.buffer.read(h["program_bytes"]), "rbee-install", "exec"), '
          '{"__name__": "__rbee_install__", "HEADER": h})')


@dataclass(frozen=True)
class InstallOptions:
    """What `rbee hosts install` was asked for."""

    backend: str = "auto"
    prefix: str | None = None
    upgrade: bool = False
    accept_new_host_key: bool = False
    check_timeout: float = 20.0


def remote_command() -> str:
    """The one command line the host runs: constant, every word quoted."""
    return f"sh -c {shlex.quote(BOOTSTRAP)} rbee-install {shlex.quote(LOADER)}"


def llama_requirement() -> str:
    """llama-cpp-python at the controller's own version (so both ends, and pip's wheel cache,
    agree); the declared range when this controller has none."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"llama-cpp-python=={version('llama-cpp-python')}"
    except PackageNotFoundError:
        return "llama-cpp-python>=0.3.8"


def program_input(host: HostConfig, wheel: Wheel, opts: InstallOptions) -> bytes:
    """What goes to the host's stdin: a JSON header (env included), the program, the wheel."""
    program = PROGRAM.read_bytes()
    header = {
        "env": host.env,
        "options": {"backend": opts.backend, "prefix": opts.prefix, "upgrade": opts.upgrade,
                    "version": wheel.version, "commit": wheel.commit, "dirty": wheel.dirty,
                    "schema": HIVE_SCHEMA_VERSION, "llama": llama_requirement(),
                    "wheel_name": wheel.name},
        "program_bytes": len(program),
        "wheel_bytes": len(wheel.data),
    }
    return json.dumps(header).encode() + b"\n" + program + wheel.data


def run_program(host: HostConfig, wheel: Wheel, opts: InstallOptions,
                report: Reporter = null_reporter) -> Doc:
    """Run the install program on the host; its result (what it found and did)."""
    from rbee_keeper.transport import SshTransport

    if host.transport == "local":
        raise UsageError(f"{host.name} is this machine: it runs this rbee's own rbee-hive",
                         hint="Install on SSH hosts; this checkout is updated with git.")
    transport = SshTransport(host, opts.accept_new_host_key)
    try:
        reply = transport.run_command(remote_command(), program_input(host, wheel, opts),
                                      on_event=report)
    finally:
        transport.close()
    if reply.error is not None:
        err = RemoteError.from_envelope(reply.error, exit_code=1)
        err.details.setdefault("host", host.name)
        raise err
    if reply.result is None:
        said = (reply.stderr.strip() or "\n".join(reply.stray)).strip().splitlines()
        raise InstallFailed(f"{host.name}: the install program exited with status "
                            f"{reply.exit_code} and no result: {said[-1] if said else 'no output'}",
                            host=host.name, stderr=said[-20:])
    return dict(reply.result)


def _checked(name: str, opts: InstallOptions) -> Doc:
    from rbee_keeper.hive import Session
    from rbee_keeper.pool import check_hosts

    with Session(opts.accept_new_host_key) as session:
        doc = check_hosts({name: get_host(name)}, session, opts.check_timeout)
    return dict(doc["hosts"][0])


def install_host(host: HostConfig, wheel: Wheel, opts: InstallOptions,
                 report: Reporter = null_reporter, add: bool = False) -> Doc:
    """Install on one host, point its `hive` at the result (adding the host to hosts.toml
    when `add`), and check it the way `rbee hosts check` does."""
    result = run_program(host, wheel, opts, report)
    if add:
        add_host(host.name, validate(HostConfig, {**host.model_dump(exclude_unset=True),
                                                  "hive": result["hive"]}, hosts_path(), ""))
        hosts_toml = "added"
    else:
        hosts_toml = "updated" if set_hive(host.name, result["hive"]) else "unchanged"
    doc: Doc = {"wanted": {"version": wheel.version, "commit": wheel.commit,
                           "dirty": wheel.dirty},
                **result, "hosts_toml": hosts_toml, "hint": None}
    if result["action"] == "none" and result["differs"]:
        before = result["before"] or {}
        doc["hint"] = (f"{host.name} runs rbee {before.get('version')} ({before.get('backend')}"
                       f"); this is {wheel.version} ({result['backend']}): "
                       f"rbee hosts install {host.name} --upgrade")
    check = _checked(host.name, opts)
    doc["check"] = {"ok": check["ok"], "checks": check["checks"]}
    if not check["ok"]:
        err = check["error"]
        raise RemoteError(err["code"], f"{host.name}: installed, but the check failed: "
                          f"{err['message']}", hint=err.get("hint") or "",
                          **{**err.get("details", {}), "host": host.name, "install": doc})
    return doc


def _targets(names: list[str], all_hosts: bool, ssh: str | None,
             env: list[str]) -> tuple[dict[str, HostConfig], set[str]]:
    """The hosts to install on, and which of them are new (to add to hosts.toml)."""
    hosts = load_hosts()
    if env and ssh is None:
        raise UsageError("--env goes with --ssh (a new host); a known host's env is in "
                         "hosts.toml")
    if ssh is not None:
        if all_hosts or len(names) != 1:
            raise UsageError("--ssh adds one host: give exactly one NAME with it")
        name = names[0]
        host = new_host(name, ssh=ssh, local=False, hive="rbee-hive", address=None, env=env)
        if name not in hosts:
            return {name: host}, {name}
        known = hosts[name]
        if known.ssh != host.ssh or (env and known.env != host.env):
            raise UsageError(f"{name} is already in hosts.toml, otherwise (ssh = "
                             f"{known.ssh!r})", hint=f"Drop --ssh and --env, or first: "
                             f"rbee hosts rm {name}")
        return {name: known}, set()  # the same command again: install (or not) as usual
    if all_hosts:
        remote = {n: h for n, h in hosts.items() if h.transport == "ssh"}
        if not remote:
            raise UsageError("hosts.toml has no SSH hosts to install on",
                             hint="Add one: rbee hosts install NAME --ssh USER@HOST")
        return remote, set()
    if not names:
        raise UsageError("name the hosts to install on, or give --all")
    try:
        return {n: get_host(n, hosts) for n in names}, set()
    except UnknownHost as e:
        raise UnknownHost(e.message, hint="Give its address to add it: rbee hosts install "
                          "NAME --ssh USER@HOST") from e


def install_hosts(names: list[str], opts: InstallOptions, *, all_hosts: bool = False,
                  ssh: str | None = None, env: list[str] | None = None,
                  report: Reporter = null_reporter) -> Doc:
    """The `rbee.hosts.install/v1` document: each host installed (in parallel) and checked.

    With `ssh` (and `env`), NAME is a new host, written to hosts.toml once installed."""
    if opts.backend not in BACKEND_CHOICES:
        raise UsageError(f"--backend {opts.backend!r}: choose {', '.join(BACKEND_CHOICES)}")
    targets, new = _targets(names, all_hosts, ssh, env or [])
    for host in targets.values():
        if host.transport == "local":
            raise UsageError(f"{host.name} is this machine: it runs this rbee's own rbee-hive",
                             hint="Install on SSH hosts; this checkout is updated with git.")
    wheel = build_wheel()
    lock = threading.Lock()

    def reporter_for(name: str) -> Reporter:
        if len(targets) == 1:
            return report

        def tagged(event: dict[str, Any]) -> None:
            event = dict(event)
            if "phase" in event:
                event["phase"] = f"{name}: {event['phase']}"
            if event.get("message"):
                event["message"] = f"{name}: {event['message']}"
            with lock:
                report(event)
        return tagged

    outcomes = fan_out(targets, lambda n: install_host(targets[n], wheel, opts,
                                                       reporter_for(n), add=n in new),
                       INSTALL_TIMEOUT)
    return {"schema": INSTALL, "status": overall(outcomes)[0],
            "hosts": [o.to_dict("install") for o in outcomes]}
