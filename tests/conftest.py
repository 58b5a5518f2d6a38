"""Fixtures: isolated state dirs, the tiny model, a loopback Hugging Face server."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import BIN, run
from tests.hubserver import HubServer
from tests.sshd import Sshd, SshLab, keygen
from tests.tinymodel import write_split_tiny_model, write_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~430 KB llama GGUF that real llama.cpp loads (see tests/tinymodel.py)."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_bytes(tiny_model: Path) -> bytes:
    return tiny_model.read_bytes()


@pytest.fixture(scope="session")
def split_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The tiny model (the same weights) in three files, as llama.cpp's gguf-split writes
    them: tiny-00001-of-00003.gguf …"""
    return write_split_tiny_model(tmp_path_factory.mktemp("split") / "tiny.gguf", files=3)


@dataclass
class Env:
    root: Path
    home: Path
    rbee_home: Path
    config: Path


def isolate(root: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    """Point HOME, RBEE_HOME and the config dir under `root`; clear what would leak in."""
    env = Env(root, root / "home", root / "rbee-home", root / "config")
    for d in (env.home, env.config):
        d.mkdir()
    settings = {
        "HOME": str(env.home), "RBEE_HOME": str(env.rbee_home), "RBEE_CONFIG_DIR": str(env.config),
        "NO_COLOR": "1", "COLUMNS": "200", "TERM": "dumb", "HF_HOME": str(root / "hf"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    }
    for k, v in settings.items():
        monkeypatch.setenv(k, v)
    for k in ("SSH_AUTH_SOCK", "HF_TOKEN", "HF_ENDPOINT", "RBEE_DEBUG", "RBEE_RESERVE_MIB",
              "RBEE_LOAD_TIMEOUT", "RBEE_WORKER_BIND", "RBEE_DOWNLOAD_RETRIES", "RBEE_CHECKOUT"):
        monkeypatch.delenv(k, raising=False)
    return env


@pytest.fixture
def rbee_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    """Every test gets its own HOME, RBEE_HOME and config dir; its workers (and RPC lenders)
    are stopped after."""
    env = isolate(tmp_path, monkeypatch)
    yield env
    if (env.rbee_home / "workers").is_dir():
        from rbee_hive.workers import stop_all

        stop_all(grace=3.0)
    if (env.rbee_home / "lenders").is_dir():
        from rbee_hive.lenders import stop_all as stop_lenders

        stop_lenders(grace=3.0)


@pytest.fixture
def hub(rbee_env: Env, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    server = HubServer().start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.stop()


@pytest.fixture
def tiny_registered(rbee_env: Env, tiny_model: Path) -> str:
    """The tiny model imported into this test's RBEE_HOME as id "tiny"."""
    r = run("rbee-hive", "models", "import", str(tiny_model), "--id", "tiny", "--format", "json")
    assert r.returncode == 0, r
    return "tiny"


CHROMIUM = "/usr/bin/chromium"  # Debian's, installed by scripts/install-test-deps.sh


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if not os.path.exists(CHROMIUM):
        return "Debian's chromium is not installed: run scripts/install-test-deps.sh"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed: run scripts/install-test-deps.sh"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    sshd = None if shutil.which("sshd") or os.path.exists("/usr/sbin/sshd") else \
        "OpenSSH's sshd is not installed: run scripts/install-test-deps.sh"
    # (marker, why it cannot run, the variable that makes it required, what is required)
    for marker, missing, required, what in (
            ("ssh", sshd, "RBEE_REQUIRE_SSHD", "sshd"),
            ("browser", browser_missing(), "RBEE_REQUIRE_BROWSER", "a browser")):
        if missing is None:
            continue
        for item in items:
            if marker in item.keywords:
                if os.environ.get(required) == "1":
                    raise pytest.UsageError(f"{what} is required ({required}=1): {missing}")
                item.add_marker(pytest.mark.skip(reason=missing))


@dataclass
class SshHost:
    name: str
    sshd: Sshd
    rbee_home: Path
    config: Path


class SshPool:
    """Real sshd instances for one test, written into its hosts.toml and ~/.ssh."""

    def __init__(self, env: Env, keys: Path) -> None:
        self.lab = SshLab(env.root, env.home, env.config / "hosts.toml", str(BIN / "rbee-hive"),
                          keys)
        self.hosts: list[SshHost] = []

    def host_key(self, i: int) -> Path:
        return self.lab.host_key(i)

    def start(self, n: int, *, known: bool = True, hive: str | None = None,
              extra_env: dict[str, str] | None = None) -> list[SshHost]:
        new = [SshHost(s.name, s, s.dir / "rbee-home", s.dir / "config")
               for s in self.lab.start(n, known=known, hive=hive, env=extra_env)]
        self.hosts += new
        return new

    def close(self) -> None:
        self.lab.close()


@pytest.fixture(scope="session")
def ssh_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Client and host keys, generated once per session (ssh-keygen takes a moment)."""
    d = tmp_path_factory.mktemp("ssh-keys")
    keygen(d / "client_ed25519")
    return d


@pytest.fixture
def ssh_pool(rbee_env: Env, ssh_keys: Path) -> Iterator[SshPool]:
    pool = SshPool(rbee_env, ssh_keys)
    yield pool
    pool.close()
