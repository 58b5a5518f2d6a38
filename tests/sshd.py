"""Real OpenSSH servers on loopback: one per simulated host, each on its own 127.0.0.x."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rbee-test", "-f",
                    str(path)], check=True)
    return path


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


@dataclass
class Sshd:
    name: str
    address: str
    port: int
    dir: Path
    host_key: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def known_hosts_line(self) -> str:
        kind, key = Path(f"{self.host_key}.pub").read_text().split()[:2]
        return f"[{self.address}]:{self.port} {kind} {key}\n"

    def start(self, authorized_keys: Path) -> Sshd:
        config = self.dir / "sshd_config"
        config.write_text("\n".join([
            f"ListenAddress {self.address}", f"Port {self.port}", f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {authorized_keys}", f"PidFile {self.dir / 'sshd.pid'}",
            "UsePAM no", "StrictModes no", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password", "Subsystem sftp internal-sftp",
            "LogLevel ERROR", "MaxStartups 200", "MaxSessions 200", ""]))
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        log = open(self.dir / "sshd.log", "ab")  # noqa: SIM115 (lives as long as sshd)
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log,
                                     stderr=log)
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex((self.address, self.port)) == 0:
                    return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start: {(self.dir / 'sshd.log').read_text()}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


def user() -> str:
    return getpass.getuser()


class SshLab:
    """Several sshd "hosts" for one client HOME, written into that HOME's ~/.ssh and a
    hosts.toml: each host on its own 127.0.0.x with its own RBEE_HOME."""

    def __init__(self, root: Path, home: Path, hosts_toml: Path, hive: str,
                 keys: Path | None = None) -> None:
        self.root, self.home, self.hosts_toml, self.hive = root, home, hosts_toml, hive
        self.keys = keys or root / "ssh-keys"
        self.keys.mkdir(parents=True, exist_ok=True)
        self.client_key = self.keys / "client_ed25519"
        if not self.client_key.exists():
            keygen(self.client_key)
        self.authorized = self.keys / "authorized_keys"
        self.authorized.write_text(Path(f"{self.client_key}.pub").read_text())
        self.sshds: list[Sshd] = []

    def host_key(self, i: int) -> Path:
        path = self.keys / f"host{i}_ed25519"
        return path if path.exists() else keygen(path)

    def _client(self) -> Path:
        ssh_dir = self.home / ".ssh"
        ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = ssh_dir / "id_ed25519"
        if not key.exists():
            shutil.copy(self.client_key, key)
            key.chmod(0o600)
            (ssh_dir / "config").write_text(
                f"Host 127.0.0.*\n  User {user()}\n  IdentityFile {key}\n"
                "  IdentitiesOnly yes\n")
        return ssh_dir

    def start(self, n: int, *, known: bool = True, hive: str | None = None,
              env: dict[str, str] | None = None) -> list[Sshd]:
        ssh_dir = self._client()
        started = []
        for i in range(len(self.sshds), len(self.sshds) + n):
            address = f"127.0.0.{10 + i}"
            d = self.root / "hosts" / f"h{i + 1}"
            d.mkdir(parents=True)
            sshd = Sshd(f"h{i + 1}", address, free_port(address), d, self.host_key(i))
            sshd.start(self.authorized)
            self.sshds.append(sshd)
            started.append(sshd)
            if known:
                with open(ssh_dir / "known_hosts", "a") as f:
                    f.write(sshd.known_hosts_line)
            # each "host" has its own Hugging Face cache, as separate machines do (rbee
            # shares downloads with it; the login's HOME is the real user's)
            host_env = {"RBEE_HOME": str(d / "rbee-home"), "RBEE_CONFIG_DIR": str(d / "config"),
                        "HF_HOME": str(d / "hf"),
                        **({"HF_ENDPOINT": os.environ["HF_ENDPOINT"]}
                           if "HF_ENDPOINT" in os.environ else {}), **(env or {})}
            pairs = ", ".join(f'{k} = "{v}"' for k, v in host_env.items())
            with open(self.hosts_toml, "a") as f:
                f.write(f'\n[hosts.{sshd.name}]\nssh = "{user()}@{address}:{sshd.port}"\n'
                        f'hive = "{hive or self.hive}"\naddress = "{address}"\n'
                        f"env = {{ {pairs} }}\n")
        return started

    def rbee_home(self, sshd: Sshd) -> Path:
        return sshd.dir / "rbee-home"

    def close(self) -> None:
        for sshd in self.sshds:
            home = self.rbee_home(sshd)
            if (home / "workers").is_dir() or (home / "lenders").is_dir():  # stops both
                subprocess.run([str(Path(self.hive).parent / "rbee-hive"), "worker", "stop",
                                "--all", "--timeout", "3"], capture_output=True,
                               env={**os.environ, "RBEE_HOME": str(home)})
            sshd.stop()
