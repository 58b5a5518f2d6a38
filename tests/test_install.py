"""`rbee hosts install` on a real sshd "host" with an empty HOME: a bare machine to a pool
member, then a no-op, an upgrade after a local commit, and a host without a compiler.

One host is installed once for the whole module (an install takes about a minute even with
llama-cpp-python's wheel in pip's cache); the tests read what that install did and build on
it, in file order. The host's pip uses this machine's real cache (PIP_CACHE_DIR, through the
host's env), so the wheel built once on this machine is reused and nothing compiles here.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rbee_common.paths import repo_root
from tests.conftest import Env, isolate
from tests.helpers import BIN, Result, run
from tests.sshd import Sshd, SshLab, user
from tests.test_contracts import HOST_OUTCOME, shape

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(900)]

# read before any fixture points HOME elsewhere: the cache this machine's builds went to
REAL_PIP_CACHE = os.environ.get("PIP_CACHE_DIR") or str(
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pip")
SECRET = "hf_install_secret_do_not_leak"
INSTALL_S = 900


@dataclass
class Lab:
    env: Env
    ssh: SshLab
    host: Sshd
    before: Result  # `rbee hosts check h1` on the bare host
    first: Result  # the first `rbee hosts install h1`
    seconds: float

    @property
    def rbee_home(self) -> Path:
        return self.host.dir / "rbee-home"

    @property
    def hosts_toml(self) -> Path:
        return self.env.config / "hosts.toml"

    def stamp(self) -> Path:
        return self.rbee_home / "venv" / "rbee-install.json"



def host_env(root: Path, name: str, **extra: str) -> dict[str, str]:
    """A host's env: an empty HOME of its own, and this machine's pip cache."""
    home = root / f"{name}-home"
    home.mkdir()
    return {"HOME": str(home), "PIP_CACHE_DIR": REAL_PIP_CACHE, **extra}


def install(*args: str, env: dict[str, str] | None = None) -> Result:
    return run("rbee", "hosts", "install", *args, "--format", "json", timeout=INSTALL_S, env=env)


def only_host(r: Result) -> dict[str, Any]:
    (h,) = r.json()["hosts"]
    return dict(h)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, ssh_keys: Path) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("install")
    with pytest.MonkeyPatch.context() as mp:
        env = isolate(root, mp)
        ssh = SshLab(env.root, env.home, env.config / "hosts.toml", str(BIN / "rbee-hive"),
                     ssh_keys)
        try:
            # a bare host: nothing installed, an empty HOME
            env_ = {"RBEE_HOME": str(root / "hosts" / "h1" / "rbee-home"),
                    **host_env(root, "h1", HF_TOKEN=SECRET)}
            (h1,) = ssh.start(1, hive="rbee-hive", env=env_)
            before = run("rbee", "hosts", "check", "h1", "--format", "json")
            # then the README's one command: install, and add it to hosts.toml
            assert run("rbee", "hosts", "rm", "h1").returncode == 0
            started = time.monotonic()
            first = install("h1", "--ssh", f"{user()}@{h1.address}:{h1.port}",
                            *(a for k, v in env_.items() for a in ("--env", f"{k}={v}")))
            yield Lab(env, ssh, h1, before, first, time.monotonic() - started)
        finally:
            ssh.close()


def test_install_brings_a_bare_host_to_a_passing_check(lab: Lab) -> None:
    assert lab.before.returncode == 1
    err = only_host(lab.before)["error"]
    assert err["code"] == "HIVE_NOT_INSTALLED" and "rbee hosts install h1" in err["hint"]

    r = lab.first
    assert r.returncode == 0, r
    doc = r.json()
    assert doc["schema"] == "rbee.hosts.install/v1" and doc["status"] == "ok"
    h = only_host(r)
    assert h["ok"] is True
    i = h["install"]
    hive = lab.rbee_home / "venv" / "bin" / "rbee-hive"
    assert i["action"] == "installed" and i["before"] is None
    assert i["hive"] == str(hive) and i["prefix"] == str(lab.rbee_home)  # $RBEE_HOME
    assert i["backend"] == "cpu"  # no NVIDIA driver here (nvcc alone is not a GPU)
    assert [s["step"] for s in i["steps"]] == ["venv", "install"]
    after = i["after"]
    assert after["version"] == i["wanted"]["version"] and after["version"].startswith("0.1.0+")
    assert after["cmake_args"] == "-DGGML_RPC=on"
    llama = after["llama_cpp"]
    from importlib.metadata import version

    assert llama["version"] == version("llama-cpp-python")  # the controller's own
    assert (llama["rpc"], llama["cuda"], llama["rebuilt"]) == (True, False, False)
    assert i["hosts_toml"] == "added" and f'hive = "{hive}"' in lab.hosts_toml.read_text()
    (listed,) = run("rbee", "hosts", "list", "--format", "json").json()["hosts"]
    assert listed["name"] == "h1" and listed["hive"] == str(hive)
    assert listed["env_keys"] == ["HF_TOKEN", "HOME", "PIP_CACHE_DIR", "RBEE_HOME"]
    assert i["check"]["ok"] is True
    assert [c["ok"] for c in i["check"]["checks"]] == [True] * 5
    # the secret reached the host (its env went over stdin) and went nowhere else
    assert "HF_TOKEN" in i["env_keys"]
    for text in (r.stdout, r.stderr, lab.stamp().read_text(), Path(i["log"]).read_text()):
        assert SECRET not in text
    assert shape(doc) == {
        ".": ["hosts", "schema", "status"],
        ".hosts[]": sorted([*HOST_OUTCOME, "install"]),
        ".hosts[].install": ["action", "after", "backend", "before", "check", "differs",
                             "env_keys", "found", "hint", "hive", "hosts_toml", "log",
                             "prefix", "steps", "venv", "wanted"],
        ".hosts[].install.after": ["backend", "cmake_args", "commit", "llama_cpp", "schema",
                                   "version"],
        ".hosts[].install.after.llama_cpp": ["cuda", "gpu_offload", "metal", "rebuilt", "rpc",
                                             "version"],
        ".hosts[].install.check": ["checks", "ok"],
        ".hosts[].install.check.checks[]": ["check", "ok", "skipped"],
        ".hosts[].install.found": ["compilers", "disk", "gpus", "gpus_missing_reason",
                                   "machine", "nvcc", "nvidia_smi", "os", "platform", "python"],
        ".hosts[].install.found.compilers": ["cc", "cxx"],
        ".hosts[].install.found.disk[]": ["free", "path"],
        ".hosts[].install.found.python": ["path", "venv", "version"],
        ".hosts[].install.steps[]": ["seconds", "step"],
        ".hosts[].install.wanted": ["commit", "dirty", "version"],
    }
    checked = run("rbee", "hosts", "check", "h1", "--format", "json")
    assert checked.returncode == 0, checked
    print(f"\nwarm-cache install on a fresh host: {lab.seconds:.1f}s, steps {i['steps']}")


def test_infer_runs_on_the_installed_host(lab: Lab, tiny_model: Path) -> None:
    imported = run("rbee", "pool", "models", "import", str(tiny_model), "--id", "tiny",
                   "--host", "h1", "--format", "json")
    assert imported.returncode == 0, imported
    r = run("rbee", "infer", "-m", "tiny", "-p", "Hello", "--max-tokens", "8", "--host", "h1",
            "--format", "json")
    assert r.returncode == 0, r
    doc = r.json()
    assert doc["host"] == "h1" and doc["text"] == "pqrstuvw"
    workers = run("rbee", "workers", "list", "--format", "json").json()["workers"]
    (w,) = workers
    argv = Path(f"/proc/{w['pid']}/cmdline").read_bytes().split(b"\0")
    venv_bin = lab.rbee_home / "venv" / "bin"  # the worker runs from the installed venv
    assert [a.decode() for a in argv[:2]] == [str(venv_bin / "python"),
                                              str(venv_bin / "llm-worker-rbee")]
    assert run("rbee", "workers", "stop", w["id"]).returncode == 0


def test_a_second_run_is_a_no_op(lab: Lab) -> None:
    toml, stamp = lab.hosts_toml.read_text(), lab.stamp().stat().st_mtime_ns
    r = install("h1")
    assert r.returncode == 0, r
    i = only_host(r)["install"]
    assert (i["action"], i["differs"], i["steps"], i["hosts_toml"]) == ("none", [], [],
                                                                       "unchanged")
    assert i["after"] == lab.first.json()["hosts"][0]["install"]["after"]
    assert i["check"]["ok"] is True
    assert lab.hosts_toml.read_text() == toml and lab.stamp().stat().st_mtime_ns == stamp
    text = run("rbee", "hosts", "install", "h1", timeout=INSTALL_S)
    assert text.returncode == 0, text
    version = i["after"]["version"]
    assert f"h1  already has rbee {version} (cpu; llama-cpp-python " in text.stdout
    assert f"hive = {lab.rbee_home}/venv/bin/rbee-hive (hosts.toml unchanged)" in text.stdout
    assert "hive:ok schema:ok" in text.stdout


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True,
                          text=True, env={**os.environ, "GIT_AUTHOR_NAME": "t",
                                          "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                                          "GIT_COMMITTER_EMAIL": "t@t"}).stdout


def test_upgrade_after_a_local_commit_changes_the_remote_version(lab: Lab) -> None:
    checkout = lab.env.root / "checkout"
    subprocess.run(["git", "clone", "-q", str(repo_root()), str(checkout)], check=True)
    marker = "# a local change, shipped by --upgrade"
    init = checkout / "rbee_common" / "__init__.py"
    init.write_text(init.read_text() + marker + "\n")
    git(checkout, "commit", "-qam", "a local change")
    commit = git(checkout, "rev-parse", "HEAD").strip()
    old = lab.first.json()["hosts"][0]["install"]["after"]["version"]
    env = {"RBEE_CHECKOUT": str(checkout)}

    plain = install("h1", env=env)  # without --upgrade: says so, changes nothing
    assert plain.returncode == 0, plain
    i = only_host(plain)["install"]
    assert i["action"] == "none" and i["differs"] == ["version"]
    assert i["after"]["version"] == old != i["wanted"]["version"]
    assert "rbee hosts install h1 --upgrade" in i["hint"]

    r = install("h1", "--upgrade", env=env)
    assert r.returncode == 0, r
    i = only_host(r)["install"]
    assert i["action"] == "upgraded" and i["before"]["version"] == old
    assert i["after"]["version"] == i["wanted"]["version"] != old
    assert i["after"]["commit"] == commit and i["wanted"]["dirty"] is False
    assert [s["step"] for s in i["steps"]] == ["install"]  # same venv, same llama.cpp build
    assert i["after"]["llama_cpp"]["rebuilt"] is False
    shipped = list((lab.rbee_home / "venv" / "lib").glob("python3*/site-packages/rbee_common/"
                                                         "__init__.py"))
    assert len(shipped) == 1 and marker in shipped[0].read_text()
    assert run("rbee", "hosts", "check", "h1", "--format", "json").returncode == 0


def test_a_host_without_a_compiler_fails_preflight_and_all_reports_each_host(lab: Lab) -> None:
    bare_path = lab.env.root / "no-compilers-bin"
    bare_path.mkdir()
    (h2,) = lab.ssh.start(1, hive="rbee-hive", env=host_env(lab.env.root, "h2",
                                                                   PATH=str(bare_path)))
    toml = lab.hosts_toml.read_text()

    r = install("--all")
    assert r.returncode == 3, r
    doc = r.json()
    assert doc["status"] == "partial"
    by = {h["name"]: h for h in doc["hosts"]}
    assert by["h1"]["ok"] is True and by["h1"]["install"]["action"] == "none"
    err = by["h2"]["error"]
    assert err["code"] == "PREFLIGHT_FAILED" and "Nothing was changed" in err["hint"]
    (missing,) = err["details"]["missing"]
    assert missing["piece"] == "compiler" and "no C and C++ compiler" in missing["message"]
    if "debian" in Path("/etc/os-release").read_text():
        assert missing["fix"] == "sudo apt-get install -y build-essential"
    assert not (h2.dir / "rbee-home").exists()  # nothing written on the host
    assert lab.hosts_toml.read_text() == toml  # nor here

    text = run("rbee", "hosts", "install", "h2", timeout=INSTALL_S)
    assert text.returncode == 1
    assert "missing compiler: no C and C++ compiler" in text.stdout
    assert "fix: " + missing["fix"] in text.stdout
