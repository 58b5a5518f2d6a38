"""Hostile text reaching the terminal: names, paths, URLs, log lines and model output that
carry rich markup or terminal escape codes. Nothing may be read as markup (a model named
`[/]` once made every list command fail) and no escape code may reach a terminal; data
written to a pipe stays byte-exact."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import Env
from tests.helpers import BIN, run
from tests.hubserver import HubServer
from tests.tinymodel import write_tiny_model

ESC = "\x1b"
HYPERLINK = f"{ESC}]8;;https://evil.example/{ESC}\\click[/]{ESC}]8;;{ESC}\\"
HOSTILE_NAMES = ["[/]", "[/x]", "[bold red]x", "[link=https://evil.example]x[/link]",
                 HYPERLINK, f"a{ESC}[2Jb", "x\x07\x08\x9b31m"]


def _no_escapes(text: str) -> None:
    assert ESC not in text and "\x9b" not in text and "\x07" not in text, repr(text[:300])


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_hostile_model_name_is_shown_literally(rbee_env: Env, name: str) -> None:
    path = write_tiny_model(rbee_env.root / "evil.gguf", name=name)  # its GGUF general.name
    r = run("rbee-hive", "models", "import", str(path), "--id", "evil")
    assert r.returncode == 0, r
    _no_escapes(r.stdout + r.stderr)
    for args in (["models", "list"], ["status"], ["models", "info", "evil"]):
        shown = run("rbee-hive", *args)
        assert shown.returncode == 0, shown
        _no_escapes(shown.stdout + shown.stderr)
    info = run("rbee-hive", "models", "info", "evil").stdout
    visible = name.replace(ESC, "\\x1b").replace("\x07", "\\x07").replace("\x08", "\\x08")
    assert visible.replace("\x9b", "\\x9b") in info  # shown as text, brackets and all
    pool = run("rbee", "pool", "models", "list", "--host", "localhost")
    assert pool.returncode == 0, pool
    _no_escapes(pool.stdout + pool.stderr)
    # and JSON keeps the name exactly as it is
    doc = run("rbee-hive", "models", "list", "--format", "json").json()
    assert doc["models"][0]["name"] == name


def test_header_values_of_the_wrong_type_read_as_absent(rbee_env: Env) -> None:
    """A GGUF whose numbers are strings (markup and escape codes in them): they printed raw
    (a cleared screen, a forged link) and `models info` failed INTERNAL on the arithmetic."""
    import gguf

    path = rbee_env.root / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("llama.context_length", f"4096{ESC}]0;owned{ESC}\\[link=https://x]y{ESC}[2J")
    w.add_string("llama.block_count", "[/]")
    w.add_string("llama.attention.head_count", "8")
    w.add_uint32("llama.embedding_length", 64)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = run("rbee-hive", "models", "import", str(path), "--id", "odd")
    assert r.returncode == 0, r
    _no_escapes(r.stdout + r.stderr)
    for args in (["models", "info", "odd"], ["models", "list"], ["status"]):
        shown = run("rbee-hive", *args)
        assert shown.returncode == 0, shown
        _no_escapes(shown.stdout + shown.stderr)
    info = run("rbee-hive", "models", "info", "odd", "--format", "json").json()["gguf"]
    assert info["context_length"] is None and info["block_count"] is None, info
    assert info["head_count"] is None and info["embedding_length"] == 64


def test_header_counts_out_of_range_read_as_absent(tmp_path: Path) -> None:
    """A count per layer was built from the header's layer count: 2**40 layers (from any
    repository a user downloads from) exhausted memory; a negative count shrank estimates."""
    import gguf

    from rbee_common.ggufmeta import read_gguf_file

    path = tmp_path / "huge.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint64("llama.block_count", 1 << 40)
    w.add_uint32("llama.attention.head_count", 8)
    w.add_int32("llama.context_length", -4096)
    w.add_uint32("llama.embedding_length", 64)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = read_gguf_file(path)
    assert info.block_count is None and info.context_length is None
    assert info.head_count == 8 and info.kv_per_token is None


def test_a_url_with_markup_downloads_and_lists(rbee_env: Env, hub: HubServer,
                                               tiny_bytes: bytes) -> None:
    hub.add_file("[/x]tiny.gguf", tiny_bytes)
    r = run("rbee-hive", "models", "download", f"{hub.url}/files/[/x]tiny.gguf", "--id", "t")
    assert r.returncode == 0, r
    listed = run("rbee-hive", "models", "list")
    assert listed.returncode == 0 and "[/x]tiny.gguf" in listed.stdout, listed


def test_a_hostile_worker_log_line_does_not_break_worker_list(rbee_env: Env,
                                                               tiny_registered: str) -> None:
    rec = run("rbee-hive", "worker", "spawn", "cpu", "--model", "tiny", "--threads", "1",
              "--format", "json").json()
    with open(rec["log"], "a") as f:
        f.write(f"[/INST] {HYPERLINK} {ESC}[2J\n")
    os.kill(rec["pid"], signal.SIGKILL)
    time.sleep(0.5)
    for args in (["worker", "list"], ["status"], ["worker", "logs", rec["id"]]):
        r = run("rbee-hive", *args)
        assert r.returncode == 0, r
        assert "[/INST]" in r.stdout
    # `worker logs` into a pipe is the log as it is: data for scripts stays exact
    logs = run("rbee-hive", "worker", "logs", rec["id"]).stdout
    assert HYPERLINK in logs
    shown = run("rbee-hive", "worker", "list").stdout
    _no_escapes(shown)
    assert run("rbee", "workers", "list").returncode == 0


def _on_a_terminal(argv: list[str], env: dict[str, str], timeout: float = 60) -> bytes:
    """What a program writes to a real terminal (a pty), and its exit status."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, stdout=follower, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, env=env)
    os.close(follower)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=10)
    os.close(leader)
    assert proc.returncode == 0, out
    return out


def test_model_output_is_neutralised_on_a_terminal_and_exact_in_a_pipe(
        rbee_env: Env, tiny_registered: str) -> None:
    args = ["infer", "-m", "tiny", "-p", "#", "--max-tokens", "8", "--temperature", "0"]
    piped = run("rbee", *args)
    assert piped.returncode == 0, piped
    assert piped.stdout == f"{ESC}[2J\n"  # the bytes the model wrote, exactly
    shown = _on_a_terminal([str(BIN / "rbee"), *args], dict(os.environ))
    assert b"\x1b[2J" not in shown and b"\\x1b[2J" in shown
    doc = run("rbee", *args, "--format", "json").json()
    assert doc["text"] == f"{ESC}[2J"
