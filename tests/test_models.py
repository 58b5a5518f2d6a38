"""rbee-hive models: catalog, import, info, verify, rm, and downloads through a real hub."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import Env
from tests.helpers import error_of, popen, run
from tests.hubserver import HubServer

REPO = "rbee-test/Tiny-GGUF"
FILE = "tiny-q8.gguf"
HF_REF = f"hf:{REPO}/{FILE}"


def write_user_catalog(env: Env, text: str) -> Path:
    path = env.config / "catalog.toml"
    path.write_text(text)
    return path


def test_catalog_lists_shipped_entries_and_user_entries_win(rbee_env: Env) -> None:
    write_user_catalog(rbee_env, '[[models]]\nid = "tinyllama"\nname = "My TinyLlama"\n'
                                 'source = "hf:me/tl-GGUF/tl.gguf"\n')
    r = run("rbee-hive", "models", "catalog", "--format", "json")
    assert r.returncode == 0, r
    doc = r.json()
    assert doc["schema"] == "rbee.hive.catalog/v1"
    by_id = {m["id"]: m for m in doc["models"]}
    assert {"gemma3-270m", "qwen2.5-0.5b", "llama3.2-3b", "phi3-mini"} <= set(by_id)
    assert by_id["tinyllama"]["name"] == "My TinyLlama"
    assert by_id["gemma3-270m"]["sha256"].startswith("a5fd3b62")
    assert set(by_id["gemma3-270m"]) >= {"id", "name", "source", "sha256", "size", "downloaded"}
    assert by_id["gemma3-270m"]["downloaded"] is False


def test_catalog_syntax_error_names_file_and_line(rbee_env: Env) -> None:
    path = write_user_catalog(rbee_env, '[[models]]\nid = "a"\nname = "unterminated\n')
    r = run("rbee-hive", "models", "catalog", "--format", "json")
    assert r.returncode == 1
    err = error_of(r)
    assert err["code"] == "CONFIG_INVALID"
    assert err["details"] == {"file": str(path), "line": 3}
    assert f"{path}:3" in err["message"]


def test_catalog_invalid_field_names_its_line_in_text_mode(rbee_env: Env) -> None:
    path = write_user_catalog(rbee_env, '[[models]]\nid = "ok"\nname = "ok"\n'
                                        'source = "file:/m.gguf"\n'
                                        '\n[[models]]\nid = "bad"\nname = "bad"\n'
                                        'source = "hf:a/b/c.gguf"\nsha256 = "nothex"\n')
    r = run("rbee-hive", "models", "catalog")
    assert r.returncode == 1
    assert r.stdout == ""
    assert f"{path}:10" in r.stderr and "models.1.sha256" in r.stderr
    assert "CONFIG_INVALID" in r.stderr and "Hint:" in r.stderr


def test_import_info_verify_rm(rbee_env: Env, tiny_model: Path) -> None:
    import shutil

    # a private copy: import hard-links, and this test tampers with the registered file
    tiny_model = Path(shutil.copy(tiny_model, rbee_env.root / "mine.gguf"))
    r = run("rbee-hive", "models", "import", str(tiny_model), "--id", "tiny", "--format", "json")
    assert r.returncode == 0, r
    rec = r.json()
    assert rec["schema"] == "rbee.hive.model/v1"
    assert rec["sha256"] == hashlib.sha256(tiny_model.read_bytes()).hexdigest()
    assert Path(rec["path"]).is_file() and rec["size"] == tiny_model.stat().st_size

    listed = run("rbee-hive", "models", "list", "--format", "json").json()
    assert listed["schema"] == "rbee.hive.models/v1"
    assert [m["id"] for m in listed["models"]] == ["tiny"]

    info = run("rbee-hive", "models", "info", "tiny", "--ctx", "8192", "--format", "json").json()
    g = info["gguf"]
    assert (g["architecture"], g["block_count"], g["context_length"]) == ("llama", 2, 32768)
    assert (g["head_count"], g["head_count_kv"], g["file_type"]) == (4, 2, "F32")
    est = info["estimate"]
    # 2 layers x 2 KV heads x (16 + 16) dims x 2 bytes (f16) per token
    assert est["ctx"] == 8192 and est["kv_bytes"] == 2 * 2 * 32 * 2 * 8192
    assert est["total_bytes"] == est["weights_bytes"] + est["kv_bytes"] + est["overhead_bytes"]

    assert run("rbee-hive", "models", "verify", "tiny", "--format", "json").json()["ok"] is True
    with open(rec["path"], "ab") as f:
        f.write(b"tampered")
    bad = run("rbee-hive", "models", "verify", "tiny", "--format", "json")
    assert bad.returncode == 1 and error_of(bad)["code"] == "CHECKSUM_MISMATCH"

    gone = run("rbee-hive", "models", "rm", "tiny", "--format", "json")
    assert gone.returncode == 0 and gone.json()["removed"] is True
    assert not Path(rec["path"]).exists()
    assert run("rbee-hive", "models", "list", "--format", "json").json()["models"] == []
    assert tiny_model.is_file()  # the user's own file is never touched


def test_import_of_a_non_gguf_registers_nothing(rbee_env: Env) -> None:
    junk = rbee_env.root / "notes.gguf"
    junk.write_bytes(b"PK\x03\x04 this is a zip file")
    r = run("rbee-hive", "models", "import", str(junk), "--format", "json")
    assert r.returncode == 1 and error_of(r)["code"] == "NOT_A_GGUF"
    assert run("rbee-hive", "models", "list", "--format", "json").json()["models"] == []


def test_download_from_hub_registers_and_verifies(hub: HubServer, tiny_bytes: bytes) -> None:
    hub.add_repo_file(REPO, FILE, tiny_bytes)
    r = run("rbee-hive", "models", "download", HF_REF, "--format", "json")
    assert r.returncode == 0, r
    rec = r.json()
    assert rec["id"] == "tiny-q8" and rec["source"] == HF_REF
    assert rec["sha256"] == hashlib.sha256(tiny_bytes).hexdigest()
    assert rec["revision"] == "0123456789abcdef0123456789abcdef01234567"
    assert rec["transferred_bytes"] == len(tiny_bytes) and rec["already_present"] is False
    again = run("rbee-hive", "models", "download", HF_REF, "--format", "json").json()
    assert again["already_present"] is True and again["transferred_bytes"] == 0
    assert len(hub.gets()) == 1  # the second run fetched nothing


def test_dropped_connection_resumes_on_next_run(hub: HubServer, tiny_bytes: bytes,
                                                rbee_env: Env) -> None:
    hub.add_repo_file(REPO, FILE, tiny_bytes)
    hub.drop_next(after_bytes=200_000)
    first = run("rbee-hive", "models", "download", HF_REF, "--format", "json",
                env={"RBEE_DOWNLOAD_RETRIES": "0"})
    assert first.returncode == 1
    err = error_of(first)
    assert err["code"] == "DOWNLOAD_FAILED" and "resume" in err["hint"]
    part = rbee_env.rbee_home / "downloads" / "tiny-q8.part"
    assert part.stat().st_size == 200_000
    assert run("rbee-hive", "models", "list", "--format", "json").json()["models"] == []

    second = run("rbee-hive", "models", "download", HF_REF, "--format", "json")
    assert second.returncode == 0, second
    rec = second.json()
    assert rec["resumed_from"] == 200_000
    assert rec["transferred_bytes"] == len(tiny_bytes) - 200_000
    last = hub.gets()[-1]
    assert last.range == "bytes=200000-" and last.status == 206
    assert last.sent == len(tiny_bytes) - 200_000
    assert rec["sha256"] == hashlib.sha256(tiny_bytes).hexdigest()
    assert not part.exists()


def test_dropped_connection_is_retried_within_the_run(hub: HubServer, tiny_bytes: bytes) -> None:
    hub.add_repo_file(REPO, FILE, tiny_bytes)
    hub.drop_next(after_bytes=100_000, times=2)
    r = run("rbee-hive", "models", "download", HF_REF, "--format", "json")
    assert r.returncode == 0, r
    ranges = [g.range for g in hub.gets()]
    assert ranges == [None, "bytes=100000-", "bytes=200000-"]
    assert r.json()["sha256"] == hashlib.sha256(tiny_bytes).hexdigest()


@pytest.mark.parametrize("sig, code", [(signal.SIGKILL, -9), (signal.SIGINT, 130)])
def test_interrupted_download_resumes(hub: HubServer, rbee_env: Env, sig: int, code: int) -> None:
    body = _big_gguf(rbee_env, 3_000_000)
    hub.add_file("big.gguf", body)
    hub.state.bytes_per_sec = 1_000_000
    url = f"{hub.url}/files/big.gguf"
    proc = popen("rbee-hive", "models", "download", url, "--format", "json")
    part = rbee_env.rbee_home / "downloads" / "big.part"
    deadline = time.monotonic() + 20
    while not (part.exists() and part.stat().st_size > 500_000):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == code
    if sig == signal.SIGINT:
        assert '"CANCELLED"' in out and "resume" in out
    kept = part.stat().st_size
    assert 0 < kept < len(body)
    hub.state.bytes_per_sec = None
    r = run("rbee-hive", "models", "download", url, "--format", "json")
    assert r.returncode == 0, r
    rec = r.json()
    assert rec["resumed_from"] == kept and rec["transferred_bytes"] == len(body) - kept
    assert hub.gets()[-1].range == f"bytes={kept}-"
    assert rec["sha256"] == hashlib.sha256(body).hexdigest()


def _big_gguf(env: Env, size: int) -> bytes:
    """A valid GGUF header padded to `size` bytes (llama.cpp is not asked to load it)."""
    from tests.tinymodel import write_tiny_model

    head = write_tiny_model(env.root / "pad.gguf").read_bytes()
    return head + os.urandom(size - len(head))


def test_catalog_checksum_mismatch_registers_nothing(hub: HubServer, rbee_env: Env,
                                                     tiny_bytes: bytes) -> None:
    hub.add_repo_file(REPO, FILE, tiny_bytes)
    write_user_catalog(rbee_env, f'[[models]]\nid = "tiny"\nname = "Tiny"\nsource = "{HF_REF}"\n'
                                 f'sha256 = "{"0" * 64}"\n')
    r = run("rbee-hive", "models", "download", "tiny", "--format", "json")
    assert r.returncode == 1
    err = error_of(r)
    assert err["code"] == "CHECKSUM_MISMATCH" and err["details"]["expected"] == "0" * 64
    assert err["details"]["actual"] == hashlib.sha256(tiny_bytes).hexdigest()
    assert run("rbee-hive", "models", "list", "--format", "json").json()["models"] == []
    assert not list((rbee_env.rbee_home / "downloads").glob("*.part"))


def test_hub_checksum_mismatch_registers_nothing(hub: HubServer, tiny_bytes: bytes) -> None:
    hub.add_repo_file(REPO, FILE, tiny_bytes, etag="f" * 64)
    r = run("rbee-hive", "models", "download", HF_REF, "--format", "json")
    assert r.returncode == 1 and error_of(r)["code"] == "CHECKSUM_MISMATCH"
    assert "the server" in error_of(r)["message"]
    assert run("rbee-hive", "models", "list", "--format", "json").json()["models"] == []


@pytest.mark.parametrize("ref, needle", [
    (f"hf:{REPO}/missing.gguf", "is not in"),
    ("hf:nobody/Nothing-GGUF/x.gguf", "does not exist"),
])
def test_404_is_model_not_found_with_a_hint(hub: HubServer, tiny_bytes: bytes, ref: str,
                                            needle: str) -> None:
    hub.add_repo_file(REPO, FILE, tiny_bytes)
    r = run("rbee-hive", "models", "download", ref)
    assert r.returncode == 1 and r.stdout == ""
    assert "MODEL_NOT_FOUND" in r.stderr and needle in r.stderr and "Hint:" in r.stderr


def test_download_of_a_non_gguf_registers_nothing(hub: HubServer, rbee_env: Env) -> None:
    hub.add_repo_file(REPO, "readme.gguf", b"<html>this is not a model</html>" * 100)
    r = run("rbee-hive", "models", "download", f"hf:{REPO}/readme.gguf", "--format", "json")
    assert r.returncode == 1 and error_of(r)["code"] == "NOT_A_GGUF"
    assert run("rbee-hive", "models", "list", "--format", "json").json()["models"] == []
    assert not list((rbee_env.rbee_home / "downloads").glob("*.part"))


def test_https_url_download_and_ndjson_progress(hub: HubServer, tiny_bytes: bytes) -> None:
    hub.add_file("tiny.gguf", tiny_bytes)
    r = run("rbee-hive", "models", "download", f"{hub.url}/files/tiny.gguf", "--format", "ndjson")
    assert r.returncode == 0, r
    events = r.lines()
    assert events[0]["event"] == "phase" and events[0]["total"] == len(tiny_bytes)
    assert any(e["event"] == "progress" for e in events)
    assert events[-1]["event"] == "result"
    assert events[-1]["result"]["sha256"] == hashlib.sha256(tiny_bytes).hexdigest()


@pytest.mark.parametrize("ref", [
    "../../etc/passwd", "$(touch /tmp/pwned)", "hf:org/repo/../../x.gguf", "tiny; rm -rf /",
    "hf:org/repo/model.bin", "ftp://host/x.gguf", "http://example.com/x.gguf", "file:relative.gguf",
])
def test_invalid_model_refs_are_rejected_before_anything_runs(rbee_env: Env, ref: str) -> None:
    r = run("rbee-hive", "models", "download", ref, "--format", "json")
    assert r.returncode == 1
    assert error_of(r)["code"] == "INVALID_MODEL_REF"
    assert not (rbee_env.rbee_home / "downloads").exists()
    assert not Path("/tmp/pwned").exists()


@pytest.mark.parametrize("bad_id", ["../../x", "../x", "a/b", "X", ".x", "x\n"])
def test_download_id_must_follow_the_id_rule_and_nothing_is_written(
        hub: HubServer, rbee_env: Env, tiny_bytes: bytes, bad_id: str) -> None:
    hub.add_file("tiny.gguf", tiny_bytes)
    before = sorted(rbee_env.root.rglob("*"))
    r = run("rbee-hive", "models", "download", f"{hub.url}/files/tiny.gguf", "--id", bad_id,
            "--format", "json")
    assert r.returncode == 2, r
    err = error_of(r)
    assert err["code"] == "USAGE" and repr(bad_id) in err["message"]
    assert "lower-case letters, digits" in err["message"]  # the rule, in words
    assert sorted(rbee_env.root.rglob("*")) == before  # x.gguf, x.part, a lock: nothing
    assert hub.gets() == []


def test_sha256_is_checked_for_file_sources(rbee_env: Env, tiny_model: Path) -> None:
    actual = hashlib.sha256(tiny_model.read_bytes()).hexdigest()
    r = run("rbee-hive", "models", "download", f"file:{tiny_model}", "--sha256", "0" * 64,
            "--format", "json")
    assert r.returncode == 1, r
    err = error_of(r)
    assert err["code"] == "CHECKSUM_MISMATCH"
    assert (err["details"]["expected"], err["details"]["actual"]) == ("0" * 64, actual)
    assert run("rbee-hive", "models", "list", "--format", "json").json()["models"] == []
    assert not list((rbee_env.rbee_home / "models").glob("*.gguf"))

    # a catalog entry's sha256 holds too when it is fetched under another --id
    write_user_catalog(rbee_env, f'[[models]]\nid = "mine"\nname = "Mine"\n'
                                 f'source = "file:{tiny_model}"\nsha256 = "{"1" * 64}"\n')
    r = run("rbee-hive", "models", "download", "mine", "--id", "other", "--format", "json")
    assert r.returncode == 1 and error_of(r)["code"] == "CHECKSUM_MISMATCH", r
    assert run("rbee-hive", "models", "list", "--format", "json").json()["models"] == []

    ok = run("rbee-hive", "models", "download", f"file:{tiny_model}", "--sha256", actual,
             "--format", "json")
    assert ok.returncode == 0, ok
    assert ok.json()["sha256"] == actual
