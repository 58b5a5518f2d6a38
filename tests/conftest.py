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
from tests.sshd import Sshd, free_port, keygen, user
from tests.tinymodel import write_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~430 KB llama GGUF that real llama.cpp loads (see tests/tinymodel.py)."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_bytes(tiny_model: Path) -> bytes:
    return tiny_model.read_bytes()


@dataclass
class Env:
    root: Path
    home: Path
    rbee_home: Path
    config: Path


@pytest.fixture
def rbee_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    """Every test gets its own HOME, RBEE_HOME and config dir; its workers are stopped after."""
    env = Env(tmp_path, tmp_path / "home", tmp_path / "rbee-home", tmp_path / "config")
    for d in (env.home, env.config):
        d.mkdir()
    settings = {
        "HOME": str(env.home), "RBEE_HOME": str(env.rbee_home), "RBEE_CONFIG_DIR": str(env.config),
        "NO_COLOR": "1", "COLUMNS": "200", "TERM": "dumb", "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    }
    for k, v in settings.items():
        monkeypatch.setenv(k, v)
    for k in ("SSH_AUTH_SOCK", "HF_TOKEN", "HF_ENDPOINT", "RBEE_DEBUG", "RBEE_RESERVE_MIB",
              "RBEE_LOAD_TIMEOUT", "RBEE_WORKER_BIND", "RBEE_DOWNLOAD_RETRIES", "RBEE_CHECKOUT"):
        monkeypatch.delenv(k, raising=False)
    yield env
    if (env.rbee_home / "workers").is_dir():
        from rbee_hive.workers import stop_all

        stop_all(grace=3.0)


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if shutil.which("sshd") or os.path.exists("/usr/sbin/sshd"):
        return
    skip = pytest.mark.skip(
        reason="OpenSSH's sshd is not installed: run scripts/install-test-deps.sh")
    for item in items:
        if "ssh" in item.keywords:
            if os.environ.get("RBEE_REQUIRE_SSHD") == "1":
                raise pytest.UsageError("sshd is required (RBEE_REQUIRE_SSHD=1) but not installed")
            item.add_marker(skip)


@dataclass
class SshMaterial:
    dir: Path
    client_key: Path
    authorized_keys: Path

    def host_key(self, i: int) -> Path:
        path = self.dir / f"host{i}_ed25519"
        return path if path.exists() else keygen(path)


@pytest.fixture(scope="session")
def ssh_material(tmp_path_factory: pytest.TempPathFactory) -> SshMaterial:
    d = tmp_path_factory.mktemp("ssh")
    client = keygen(d / "client_ed25519")
    authorized = d / "authorized_keys"
    authorized.write_text(Path(f"{client}.pub").read_text())
    return SshMaterial(d, client, authorized)


@dataclass
class SshHost:
    name: str
    sshd: Sshd
    rbee_home: Path
    config: Path


class SshPool:
    """Real sshd instances for one test, written into its hosts.toml and ~/.ssh."""

    def __init__(self, env: Env, material: SshMaterial) -> None:
        self.env, self.material = env, material
        self.hosts: list[SshHost] = []

    def start(self, n: int, *, known: bool = True, hive: str | None = None,
              extra_env: dict[str, str] | None = None) -> list[SshHost]:
        ssh_dir = self.env.home / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        key = ssh_dir / "id_ed25519"
        if not key.exists():
            shutil.copy(self.material.client_key, key)
            key.chmod(0o600)
            (ssh_dir / "config").write_text(
                f"Host 127.0.0.*\n  User {user()}\n  IdentityFile {key}\n"
                "  IdentitiesOnly yes\n")
        first = len(self.hosts)
        for i in range(first, first + n):
            address = f"127.0.0.{10 + i}"
            d = self.env.root / "hosts" / f"h{i + 1}"
            d.mkdir(parents=True)
            sshd = Sshd(f"h{i + 1}", address, free_port(address), d, self.material.host_key(i))
            sshd.start(self.material.authorized_keys)
            host = SshHost(sshd.name, sshd, d / "rbee-home", d / "config")
            self.hosts.append(host)
            if known:
                with open(ssh_dir / "known_hosts", "a") as f:
                    f.write(sshd.known_hosts_line)
            env = {"RBEE_HOME": str(host.rbee_home), "RBEE_CONFIG_DIR": str(host.config),
                   **({"HF_ENDPOINT": os.environ["HF_ENDPOINT"]}
                      if "HF_ENDPOINT" in os.environ else {}), **(extra_env or {})}
            pairs = ", ".join(f'{k} = "{v}"' for k, v in env.items())
            with open(self.env.config / "hosts.toml", "a") as f:
                f.write(f'\n[hosts.{sshd.name}]\nssh = "{user()}@{address}:{sshd.port}"\n'
                        f'hive = "{hive or BIN / "rbee-hive"}"\naddress = "{address}"\n'
                        f"env = {{ {pairs} }}\n")
        return self.hosts[first:]

    def close(self) -> None:
        for h in self.hosts:
            if (h.rbee_home / "workers").is_dir():
                run("rbee-hive", "worker", "stop", "--all", "--timeout", "3",
                    env={"RBEE_HOME": str(h.rbee_home)})
            h.sshd.stop()


@pytest.fixture
def ssh_pool(rbee_env: Env, ssh_material: SshMaterial) -> Iterator[SshPool]:
    pool = SshPool(rbee_env, ssh_material)
    yield pool
    pool.close()
