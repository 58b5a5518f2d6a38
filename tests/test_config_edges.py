"""Configuration and options are checked at the edge: a bad hosts.toml entry, a bad option
or a bad RBEE_* variable is CONFIG_INVALID (with file and line) or USAGE at once — never
INTERNAL, never a 120 s wait, and `hosts add` never writes what cannot be read back."""

from __future__ import annotations

import json

import pytest

from tests.conftest import Env
from tests.helpers import error_of, run

BAD_HOSTS = [  # (hosts.toml text, line at fault, words the message must hold)
    ('[hosts.a]\nssh = "me@h:22"\nhive = "rbee-hive \\"x"\n', 3, "split"),
    ('[hosts.a]\nssh = "me@h:22"\nhive = ""\n', 3, "rbee-hive command"),
    ('[hosts.a]\nssh = "h:abc"\n', 2, "port"),
    ('[hosts.a]\nssh = "h:70000"\n', 2, "port"),
    ('[hosts.a]\nssh = "@h"\n', 2, "user"),
    ('[hosts.a]\nssh = ":22"\n', 2, "host is empty"),
    ('[hosts.a]\n', 1, "needs ssh"),
    ('[hosts.a]\nssh = "h"\nenv = { A = "b\\u0000c" }\n', 3, "control"),
    ('[hosts.a]\nssh = "h"\naddress = "a b"\n', 3, "address"),
    ('[hosts.a]\nssh = "h"\nconnect_timeout = -1\n', 3, "greater than"),
]


@pytest.mark.parametrize(("text", "line", "words"), BAD_HOSTS)
def test_a_bad_hosts_toml_entry_names_file_and_line(rbee_env: Env, text: str, line: int,
                                                    words: str) -> None:
    (rbee_env.config / "hosts.toml").write_text(text)
    r = run("rbee", "pool", "status", "--format", "json")
    assert r.returncode == 1, r
    err = error_of(r)
    assert err["code"] == "CONFIG_INVALID", err
    assert err["details"]["line"] == line and err["details"]["file"].endswith("hosts.toml")
    assert words in err["message"], err


@pytest.mark.parametrize("args", [
    ["--ssh", "h:abc"], ["--ssh", "h", "--hive", ""], ["--ssh", "h", "--hive", '"x'],
    ["--ssh", "h", "--env", "A=b\x01c"], ["--ssh", "h", "--address", "a b"],
])
def test_hosts_add_refuses_what_it_could_not_read_back(rbee_env: Env, args: list[str]) -> None:
    r = run("rbee", "hosts", "add", "x", *args, "--format", "json")
    assert r.returncode == 2 and error_of(r)["code"] == "USAGE", r
    assert "rbee hosts add --help" in error_of(r)["hint"], r  # every error says what next
    assert not (rbee_env.config / "hosts.toml").exists()


def test_an_edit_of_hosts_toml_that_would_not_read_back_changes_nothing(rbee_env: Env) -> None:
    """`rbee hosts install` writes the hive path its remote program reports: a DEL in it was
    written raw (TOML refuses it), and every later rbee command failed CONFIG_INVALID."""
    from rbee_common.errors import ConfigInvalid
    from rbee_keeper.hosts import HostConfig, add_host, load_hosts, set_hive

    assert run("rbee", "hosts", "add", "gpu1", "--ssh", "me@gpu1").returncode == 0
    path = rbee_env.config / "hosts.toml"
    before = path.read_text()
    with pytest.raises(ConfigInvalid, match="control characters"):
        set_hive("gpu1", "/opt/rbee/bin/rbee-hive\x7f")
    unchecked = HostConfig(name="gpu2", ssh="me@gpu2").model_copy(update={"hive": "x\x7f"})
    with pytest.raises(ConfigInvalid):
        add_host("gpu2", unchecked)
    assert path.read_text() == before
    assert sorted(load_hosts()) == ["gpu1", "localhost"]
    assert set_hive("gpu1", "/opt/rbee/bin/rbee-hive") is True
    assert run("rbee", "hosts", "list", "--format", "json").returncode == 0


@pytest.mark.parametrize("args", [
    ["--port", "0"], ["--port", "70000"], ["--ctx", "-1"], ["--threads", "0"],
    ["--timeout", "0"], ["--device", "a"], ["--device", "0,1"],  # a CPU worker has one device
    ["--device", "0", "--tensor-split", "x"], ["--device", "0", "--tensor-split", "0.5,0.5"],
])
def test_worker_spawn_options_are_checked_before_anything_runs(rbee_env: Env,
                                                               args: list[str]) -> None:
    r = run("rbee-hive", "worker", "spawn", "cpu", "--model", "tiny", *args, "--format", "json",
            timeout=20)
    assert r.returncode == 2 and error_of(r)["code"] == "USAGE", r
    assert error_of(r)["hint"], r


@pytest.mark.parametrize("args", [
    ["pool", "status", "--timeout", "abc"], ["pool", "status", "--timeout", "0"],
    ["infer", "-m", "tiny", "-p", "x", "--ctx", "-1"],
    ["infer", "-m", "tiny", "-p", "x", "--max-tokens", "0"],
    ["infer", "-m", "tiny", "-p", "x", "--temperature", "-1"],
    ["infer", "-m", "tiny", "-p", "x", "--device", "a,b"],
    ["infer", "-m", "tiny", "-p", "x", "--backend", "tpu"],
    ["infer", "-m", "tiny", "-p", ""],
    ["workers", "stop"],
])
def test_rbee_options_are_checked_before_anything_runs(rbee_env: Env, args: list[str]) -> None:
    r = run("rbee", *args, "--format", "json", timeout=20)
    assert r.returncode == 2 and error_of(r)["code"] == "USAGE", r
    assert error_of(r)["hint"], r  # every error says what to do next


def test_a_usage_error_without_its_own_hint_points_at_the_commands_help(rbee_env: Env) -> None:
    r = run("rbee", "infer", "-m", "tiny", "-p", "x", "--backend", "tpu")
    assert r.returncode == 2 and r.stdout == "", r
    assert "(USAGE)" in r.stderr and "Hint: Run `rbee infer --help`." in r.stderr, r
    r = run("rbee-hive", "models", "download", "tinyllama", "--sha256", "abc", "--format", "json")
    assert error_of(r)["hint"] == "Run `rbee-hive models download --help`.", r


@pytest.mark.parametrize("line", [
    "not json", '{"env": {}}', '{"argv": "status"}', '{"argv": []}', '{"argv": ["status", 1]}',
])
def test_a_hive_command_on_stdin_must_be_a_list_of_words(rbee_env: Env, line: str) -> None:
    """`rbee-hive --stdin-json` alone reads its command from stdin (how `rbee` runs one over
    SSH): anything but a list of words is a usage error, not a traceback."""
    r = run("rbee-hive", "--stdin-json", input=line + "\n", timeout=20)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r
    event = json.loads(r.stdout.splitlines()[-1])  # ndjson: what rbee reads from the hive
    assert event["event"] == "error" and event["error"]["code"] == "USAGE", r


def test_a_hive_command_on_stdin_runs_as_given(rbee_env: Env) -> None:
    line = '{"argv": ["models", "info", "no-such-model", "--format", "json"]}'
    r = run("rbee-hive", "--stdin-json", input=line + "\n", timeout=20)
    err = error_of(r)
    assert err["code"] == "MODEL_NOT_FOUND" and "no-such-model" in err["message"], r


@pytest.mark.parametrize(("name", "value"), [
    ("RBEE_RESERVE_MIB", "abc"), ("RBEE_RESERVE_MIB", "-5"), ("RBEE_MAX_RAM_MIB", "lots"),
    ("RBEE_MAX_RAM_MIB", "0"),
])
def test_a_bad_rbee_variable_is_config_invalid_naming_it(rbee_env: Env, name: str,
                                                        value: str) -> None:
    r = run("rbee-hive", "status", "--format", "json", env={name: value})
    assert r.returncode == 1, r
    err = error_of(r)
    assert err["code"] == "CONFIG_INVALID" and name in err["message"], err
    assert err["details"]["variable"] == name


@pytest.mark.parametrize(("name", "value"), [
    ("RBEE_LOAD_TIMEOUT", "soon"), ("RBEE_LOAD_TIMEOUT", "-1"),
])
def test_a_bad_load_timeout_is_config_invalid(tiny_registered: str, name: str,
                                              value: str) -> None:
    r = run("rbee-hive", "worker", "spawn", "cpu", "--model", "tiny", "--format", "json",
            env={name: value}, timeout=30)
    assert r.returncode == 1 and error_of(r)["code"] == "CONFIG_INVALID", r
    assert run("rbee-hive", "worker", "list", "--format", "json").json()["workers"] == []


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"workers": 7}',
                                     '{"workers": [3, {"id": 1}, null]}'])
def test_a_damaged_workers_json_is_set_aside_never_fatal(rbee_env: Env, tiny_registered: str,
                                                         content: str) -> None:
    (rbee_env.config / "workers.json").write_text(content)
    r = run("rbee", "infer", "-m", "tiny", "-p", "Hello", "--max-tokens", "3",
            "--temperature", "0", "--format", "json")
    assert r.returncode == 0, r
    assert r.json()["text"] == "pqr"
    if not content.startswith('{"workers": ['):
        aside = list(rbee_env.config.glob("workers.json.corrupt-*"))
        assert aside and aside[0].read_text() == content
        assert "workers.json" in r.stderr  # the warning names the file


def test_hosts_toml_is_written_for_its_owner_alone(rbee_env: Env) -> None:
    r = run("rbee", "hosts", "add", "x", "--ssh", "me@x.home.arpa", "--env", "HF_TOKEN=hf_secret")
    assert r.returncode == 0, r
    path = rbee_env.config / "hosts.toml"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert run("rbee", "hosts", "rm", "x").returncode == 0
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert "hf_secret" not in run("rbee", "hosts", "list").stdout


@pytest.mark.parametrize("argv", [["rbee"], ["rbee-hive"], ["rbee-hive", "worker"]])
def test_a_bare_command_prints_its_help_not_an_error(rbee_env: Env, argv: list[str]) -> None:
    r = run(argv[0], *argv[1:], timeout=20)
    assert r.returncode == 2 and r.stdout.startswith(f"Usage: {' '.join(argv)} "), r
    assert "Error" not in r.stdout + r.stderr, r
