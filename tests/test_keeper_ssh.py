"""rbee, the controller, over real OpenSSH servers on loopback (one sshd per host)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.conftest import Env, SshPool
from tests.helpers import BIN, error_of, popen, run
from tests.hubserver import HubServer

pytestmark = pytest.mark.ssh

REPO = "rbee-test/Tiny-GGUF"
SOURCE = f"hf:{REPO}/tiny.gguf"


@pytest.fixture
def catalog(rbee_env: Env, hub: HubServer, tiny_bytes: bytes) -> str:
    """The controller's catalog names the tiny model, served by the loopback hub."""
    hub.add_repo_file(REPO, "tiny.gguf", tiny_bytes)
    (rbee_env.config / "catalog.toml").write_text(
        f'[[models]]\nid = "tiny-hf"\nname = "Tiny"\nsource = "{SOURCE}"\n')
    return "tiny-hf"


def infer(*args: str, env: dict[str, str] | None = None) -> dict:
    r = run("rbee", "infer", *args, "--format", "json", env=env)
    assert r.returncode == 0, r
    return dict(r.json())


def test_pool_status_reports_every_host_and_exits_3_when_one_is_down(ssh_pool: SshPool) -> None:
    h1, h2, h3 = ssh_pool.start(3)
    h2.sshd.stop()
    r = run("rbee", "pool", "status", "--format", "json")
    assert r.returncode == 3, r
    doc = r.json()
    assert doc["schema"] == "rbee.pool.status/v1" and doc["status"] == "partial"
    by = {h["name"]: h for h in doc["hosts"]}
    assert by["h2"]["ok"] is False and by["h2"]["error"]["code"] == "HOST_UNREACHABLE"
    for h in (h1, h3):
        assert by[h.name]["ok"] is True
        st = by[h.name]["status"]
        assert st["schema"] == "rbee.hive.status/v1"
        assert st["host"]["rbee_home"] == str(h.rbee_home)  # its own env reached it
    text = run("rbee", "pool", "status")
    assert text.returncode == 3
    assert "h1" in text.stdout and "h3" in text.stdout and "error" in text.stdout
    assert "HOST_UNREACHABLE" in text.stderr


def _host_with_another_key(ssh_pool: SshPool, rbee_env: Env) -> None:
    """One host, and a known_hosts line for it that names another host's key."""
    (h1,) = ssh_pool.start(1, known=False)
    other = ssh_pool.host_key(7)
    kind, key = Path(f"{other}.pub").read_text().split()[:2]
    (rbee_env.home / ".ssh" / "known_hosts").write_text(
        f"[{h1.sshd.address}]:{h1.sshd.port} {kind} {key}\n")


def test_a_changed_host_key_is_refused(ssh_pool: SshPool, rbee_env: Env) -> None:
    _host_with_another_key(ssh_pool, rbee_env)
    r = run("rbee", "pool", "status", "--format", "json", "--accept-new-host-key")
    assert r.returncode == 1
    assert r.json()["hosts"][0]["error"]["code"] == "HOST_KEY_MISMATCH"


def test_the_hint_for_a_changed_host_key_is_a_command_that_works(ssh_pool: SshPool,
                                                                  rbee_env: Env) -> None:
    """On a non-22 port known_hosts keys the line `[host]:port`: the hint must name it so,
    or `ssh-keygen -R host` removes nothing and the user stays locked out."""
    import re
    import shlex
    import subprocess

    _host_with_another_key(ssh_pool, rbee_env)
    r = run("rbee", "hosts", "check", "h1", "--format", "json")
    err = r.json()["hosts"][0]["error"]
    assert err["code"] == "HOST_KEY_MISMATCH", r
    command = re.search(r"`(ssh-keygen [^`]+)`", err["hint"])
    assert command, err
    subprocess.run(shlex.split(command.group(1)), check=True, capture_output=True)
    again = run("rbee", "hosts", "check", "h1", "--accept-new-host-key", "--format", "json")
    assert again.returncode == 0, again


def test_wrong_key_is_ssh_auth_failed(ssh_pool: SshPool, rbee_env: Env) -> None:
    import subprocess

    ssh_pool.start(1)
    key = rbee_env.home / ".ssh" / "id_ed25519"
    key.unlink()
    Path(f"{key}.pub").unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    r = run("rbee", "hosts", "check", "--all", "--format", "json")
    assert r.returncode == 1
    assert r.json()["hosts"][0]["error"]["code"] == "SSH_AUTH_FAILED"


def test_missing_hive_is_hive_not_installed(ssh_pool: SshPool) -> None:
    ssh_pool.start(1, hive="/opt/nowhere/rbee-hive")
    r = run("rbee", "hosts", "check", "h1", "--format", "json")
    assert r.returncode == 1
    err = r.json()["hosts"][0]["error"]
    assert err["code"] == "HIVE_NOT_INSTALLED" and 'hive = "' in err["hint"]
    assert err["hint"].startswith("Install it: rbee hosts install h1;")


def test_another_schema_version_is_schema_mismatch(ssh_pool: SshPool, rbee_env: Env) -> None:
    # a hive from the future: the real protocol, another schema version
    script = rbee_env.root / "future-hive"
    script.write_text('#!/bin/sh\nhead -n1 >/dev/null\necho \'{"event": "result", "result": '
                      '{"schema": "rbee.hive.status/v2"}}\'\n')
    script.chmod(0o755)
    ssh_pool.start(1, hive=str(script))
    r = run("rbee", "hosts", "check", "h1", "--format", "json")
    assert r.returncode == 1
    err = r.json()["hosts"][0]["error"]
    assert err["code"] == "SCHEMA_MISMATCH" and "v2" in err["message"]
    assert err["hint"] == "Install this rbee there: rbee hosts install h1 --upgrade"


def test_infer_cold_then_warm_with_no_ssh_at_all(ssh_pool: SshPool, catalog: str,
                                                 hub: HubServer) -> None:
    hosts = ssh_pool.start(2)
    cold = infer("--model", catalog, "--prompt", "Hello", "--max-tokens", "8")
    assert cold["schema"] == "rbee.infer/v1"
    assert cold["text"] == "pqrstuvw" and cold["tokens"] == 8
    assert cold["placement"]["path"] == "cold"
    assert {"status_ms", "download_ms", "spawn_ms"} <= set(cold["timings"])
    probe, download = hub.gets()  # placement read the header, then the host downloaded
    assert probe.range == "bytes=0-16777215" and probe.status == 206
    assert download.range is None and download.status == 200
    chosen = cold["host"]
    assert cold["placement"]["chosen"]["host"] == chosen
    assert [r["host"] for r in cold["placement"]["rejected"]] == \
        [h.name for h in hosts if h.name != chosen]
    address = next(h for h in hosts if h.name == chosen).sshd.address
    assert cold["worker"]["url"].startswith(f"http://{address}:")

    for h in hosts:
        h.sshd.stop()  # from now on no SSH is possible
    warm = infer("--model", catalog, "--prompt", "Hello", "--max-tokens", "5")
    assert warm["placement"]["path"] == "warm" and warm["text"] == "pqrst"
    assert warm["worker"]["id"] == cold["worker"]["id"]
    assert "status_ms" not in warm["timings"]


def test_placement_picks_the_host_that_fits_and_explains_the_rest(
        ssh_pool: SshPool, catalog: str) -> None:
    ssh_pool.start(1, extra_env={"RBEE_RESERVE_MIB": str(10**9)})  # h1: nothing fits
    ssh_pool.start(1)  # h2 fits
    (h3,) = ssh_pool.start(1)
    h3.sshd.stop()
    doc = infer("--model", catalog, "--prompt", "Hello", "--max-tokens", "3")
    assert doc["host"] == "h2"
    rejected = {r["host"]: r for r in doc["placement"]["rejected"]}
    assert "available" in rejected["h1"]["reason"] and "needs" in rejected["h1"]["reason"]
    assert rejected["h3"]["reason"].startswith("unreachable (HOST_UNREACHABLE)")


def test_host_backend_and_device_constrain_placement(ssh_pool: SshPool, catalog: str) -> None:
    ssh_pool.start(2)
    doc = infer("--model", catalog, "--prompt", "Hello", "--max-tokens", "2", "--host", "h2",
                "--backend", "cpu", "--device", "0")
    assert doc["host"] == "h2" and doc["worker"]["backend"] == "cpu"
    r = run("rbee", "infer", "--model", catalog, "--prompt", "x", "--backend", "cuda",
            "--host", "h1", "--format", "json")
    assert r.returncode == 1
    err = error_of(r)
    assert err["code"] == "NO_PLACEMENT" and "cuda unavailable" in err["message"]


def test_prompt_with_shell_metacharacters_arrives_intact(ssh_pool: SshPool, catalog: str,
                                                         tiny_model: Path) -> None:
    import llama_cpp

    ssh_pool.start(1)
    prompt = 'He said "it\'s $(rm -rf ~) `id` \\n"\n\ttab; ünïcödé 日本 🐝 && exit 1 |!'
    doc = infer("--model", catalog, "--prompt", prompt, "--max-tokens", "10")
    assert doc["text"] == "KO" and doc["stop_reason"] == "EOS"  # the "!" at the end arrived
    vocab = llama_cpp.Llama(str(tiny_model), vocab_only=True, verbose=False)
    assert doc["prompt_tokens"] == len(vocab.tokenize(prompt.encode(), add_bos=True,
                                                      special=True))
    from_stdin = run("rbee", "infer", "--model", catalog, "--prompt", "-", "--format", "json",
                     input=prompt)
    assert from_stdin.json()["prompt_tokens"] == doc["prompt_tokens"]


def test_arguments_with_metacharacters_cross_ssh_quoted(ssh_pool: SshPool, rbee_env: Env,
                                                        tiny_model: Path) -> None:
    import pwd
    import secrets
    import shutil

    ssh_pool.start(1)
    name = f"rbee-pwned-{secrets.token_hex(4)}"
    # a shell that ran it would create the file in the SSH login's home directory
    marker = Path(pwd.getpwuid(os.getuid()).pw_dir) / name
    weird = rbee_env.root / f"it's a \"dir\" $(touch {name}) ünï"
    weird.mkdir()
    path = Path(shutil.copy(tiny_model, weird / "my model;`id`.gguf"))
    r = run("rbee", "pool", "models", "import", str(path), "--id", "weird", "--host", "h1",
            "--format", "json")
    assert r.returncode == 0, r
    assert r.json()["source"] == f"file:{path}"
    assert not marker.exists()


def test_no_word_of_a_command_meets_the_hosts_login_shell(ssh_pool: SshPool, rbee_env: Env,
                                                          tiny_model: Path) -> None:
    """What the login shell runs is the same for every command (the hive, `--stdin-json`):
    the command's own words travel on stdin. Quoting alone is not enough: fish reads a
    backslash inside single quotes, so `\\'` in a URL or a worker id broke out of them."""
    import shutil

    seen = rbee_env.root / "hive-argv"
    wrapper = rbee_env.root / "hive-wrapper"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> {seen}\n'
                       f'exec {BIN / "rbee-hive"} "$@"\n')
    wrapper.chmod(0o755)
    ssh_pool.start(1, hive=str(wrapper))
    weird = rbee_env.root / "x\\'$(touch pwned)\"\\'"
    weird.mkdir()
    path = Path(shutil.copy(tiny_model, weird / "m.gguf"))
    r = run("rbee", "pool", "models", "import", str(path), "--id", "weird", "--host", "h1",
            "--format", "json")
    assert r.returncode == 0, r
    assert r.json()["source"] == f"file:{path}"  # arrived exactly
    r = run("rbee", "pool", "worker", "stop", "--host", "h1", "no-such-worker",
            "--format", "json")
    assert error_of(r)["code"] == "WORKER_NOT_FOUND", r
    assert seen.read_text().splitlines() == ["--stdin-json", "--stdin-json"]


def _workers(host: str) -> list[dict]:
    doc = run("rbee", "workers", "list", "--host", host, "--format", "json").json()
    return list(doc["workers"])


def test_pool_passthrough_download_spawn_list_stop(ssh_pool: SshPool, catalog: str,
                                                   hub: HubServer) -> None:
    ssh_pool.start(2)
    dl = run("rbee", "pool", "models", "download", SOURCE, "--id", "tiny-hf", "--host", "h2")
    assert dl.returncode == 0, dl
    assert "tiny-hf" in dl.stdout and "Downloading tiny-hf" in dl.stderr  # remote progress
    spawned = run("rbee", "pool", "worker", "spawn", "cpu", "--model", "tiny-hf", "--host", "h2",
                  "--format", "json")
    assert spawned.returncode == 0, spawned
    rec = spawned.json()
    assert rec["host"] == "127.0.0.11"  # listening on h2's own address
    listed = run("rbee", "workers", "list", "--format", "json").json()
    assert listed["status"] == "ok"
    assert [(w["host"], w["id"]) for w in listed["workers"]] == [("h2", rec["id"])]
    warm = infer("--model", catalog, "--prompt", "Hello", "--max-tokens", "3")
    assert warm["placement"]["path"] == "warm" and warm["worker"]["id"] == rec["id"]
    stopped = run("rbee", "workers", "stop", rec["id"], "--format", "json")
    assert stopped.returncode == 0 and stopped.json()["host"] == "h2"
    assert run("rbee", "workers", "list", "--format", "json").json()["workers"] == []

    missing = run("rbee", "pool", "worker", "spawn", "cpu", "--model", "nope", "--host", "h1",
                  "--format", "json")
    assert missing.returncode == 1 and error_of(missing)["code"] == "MODEL_NOT_FOUND"
    assert error_of(missing)["details"]["host"] == "h1"
    usage = run("rbee", "pool", "models", "list")
    assert usage.returncode == 2 and "--host NAME" in usage.stderr


def test_pool_worker_logs_follow_streams_remote_lines(ssh_pool: SshPool, catalog: str) -> None:
    ssh_pool.start(1)
    infer("--model", catalog, "--prompt", "Hello", "--max-tokens", "1")
    (w,) = _workers("h1")
    follower = popen("rbee", "pool", "worker", "logs", w["id"], "--follow", "--host", "h1")
    time.sleep(1.0)
    assert run("rbee", "workers", "stop", w["id"]).returncode == 0
    out, _ = follower.communicate(timeout=20)
    assert follower.returncode == 0 and "ready on 127.0.0.10" in out


def test_hosts_add_list_rm_keep_the_users_comments(rbee_env: Env) -> None:
    path = rbee_env.config / "hosts.toml"
    assert run("rbee", "hosts", "list", "--format", "json").json()["hosts"][0]["name"] == \
        "localhost"
    r = run("rbee", "hosts", "add", "mac", "--ssh", "vince@mac.home.arpa:2222",
            "--env", "RBEE_HOME=/Users/vince/.rbee", "--env", "HF_TOKEN=hf_secret")
    assert r.returncode == 0, r
    path.write_text(path.read_text() + "# my gpu box\n")
    assert run("rbee", "hosts", "add", "ws", "--ssh", "ws").returncode == 0
    listed = run("rbee", "hosts", "list", "--format", "json").json()
    assert [h["name"] for h in listed["hosts"]] == ["localhost", "mac", "ws"]
    mac = listed["hosts"][1]
    assert mac["address"] == "mac.home.arpa" and mac["bind"] == "0.0.0.0"
    assert mac["env_keys"] == ["HF_TOKEN", "RBEE_HOME"] and "hf_secret" not in str(listed)
    assert run("rbee", "hosts", "add", "mac", "--ssh", "x@y").returncode == 2
    assert run("rbee", "hosts", "rm", "mac").returncode == 0
    text = path.read_text()
    assert "# my gpu box" in text and "[hosts.ws]" in text and "mac" not in text
    assert run("rbee", "hosts", "rm", "nope").returncode == 1


def test_proxyjump_from_ssh_config_is_honoured(ssh_pool: SshPool, rbee_env: Env) -> None:
    import getpass

    jump, target = ssh_pool.start(2)
    me = getpass.getuser()
    with open(rbee_env.home / ".ssh" / "config", "a") as f:
        f.write(f"\nHost behind-jump\n  HostName {target.sshd.address}\n"
                f"  Port {target.sshd.port}\n  User {me}\n"
                f"  ProxyJump {me}@{jump.sshd.address}:{jump.sshd.port}\n")
    # a host "via" that is h2 (same hive and env), reached through the alias
    hosts = rbee_env.config / "hosts.toml"
    h2 = hosts.read_text().split("[hosts.h2]")[1].splitlines()
    keep = [line for line in h2 if line.startswith(("hive", "env"))]
    with open(hosts, "a") as f:
        f.write('\n[hosts.via]\nssh = "behind-jump"\n' + "\n".join(keep) + "\n")
    ok = run("rbee", "hosts", "check", "via", "--format", "json")
    assert ok.returncode == 0, ok
    assert ok.json()["hosts"][0]["status"]["host"]["rbee_home"] == str(target.rbee_home)
    jump.sshd.stop()  # the target is still up, but only reachable through the jump host
    down = run("rbee", "hosts", "check", "via", "--format", "json")
    assert down.returncode == 1
    assert down.json()["hosts"][0]["error"]["code"] == "HOST_UNREACHABLE"
    assert run("rbee", "hosts", "check", "h2", "--format", "json").returncode == 0
