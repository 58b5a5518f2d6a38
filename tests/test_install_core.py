"""`rbee hosts install` without SSH: the wheel it ships, the decisions its host program makes
(fed plain facts), the bootstrap that finds a Python, and the hosts.toml edit."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest

from rbee_common.errors import UsageError
from rbee_common.paths import repo_root
from rbee_keeper import install_host as prog
from rbee_keeper.errors import InstallFailed
from rbee_keeper.hosts import HostConfig, get_host, set_hive
from rbee_keeper.install import InstallOptions, install_hosts, program_input, remote_command
from rbee_keeper.wheel import build_wheel
from tests.conftest import Env


def copy_checkout(dst: Path) -> Path:
    """The files a wheel is built from, copied (so a test may change them)."""
    src = repo_root()
    for name in ("rbee_common", "rbee_hive", "rbee_keeper", "worker"):
        shutil.copytree(src / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "catalog.toml"):
        shutil.copy(src / name, dst / name)
    return dst


def test_the_wheel_is_reproducible_and_its_version_follows_the_code(tmp_path: Path) -> None:
    root = copy_checkout(tmp_path)
    a, b = build_wheel(root), build_wheel(root)
    assert a.data == b.data and a.version == b.version
    assert a.name == f"rbee-{a.version}-py3-none-any.whl" and a.commit is None
    names = zipfile.ZipFile(io.BytesIO(a.data)).namelist()
    assert "rbee_keeper/install_host.py" in names and "rbee_hive/data/catalog.toml" in names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    info = f"rbee-{a.version}.dist-info"
    zf = zipfile.ZipFile(io.BytesIO(a.data))
    assert "rbee-hive = rbee_hive.cli:main" in zf.read(f"{info}/entry_points.txt").decode()
    assert f"Version: {a.version}" in zf.read(f"{info}/METADATA").decode()
    record = zf.read(f"{info}/RECORD").decode().splitlines()
    assert len(record) == len(names)  # every file, RECORD itself included

    (root / "rbee_hive" / "status.py").write_text("# changed\n", encoding="utf-8")
    c = build_wheel(root)
    assert c.version != a.version and c.version.startswith("0.1.0+")

    (root / "pyproject.toml").unlink()
    with pytest.raises(InstallFailed, match="not an rbee checkout"):
        build_wheel(root)


def facts(**over: Any) -> dict[str, Any]:
    """What the host program found on a plain Debian box with a compiler and no GPU."""
    base = {"os": ["debian"], "platform": "linux", "machine": "x86_64",
            "python": {"path": "/usr/bin/python3", "version": "3.11.2", "venv": True},
            "compilers": {"cc": "/usr/bin/cc", "cxx": "/usr/bin/c++"},
            "nvidia_smi": None, "gpus": [], "gpus_missing_reason": "no nvidia-smi",
            "nvcc": None, "disk": [{"path": "/home", "free": 50 << 30}]}
    return {**base, **over}


GPU = {"nvidia_smi": "/usr/bin/nvidia-smi", "gpus": ["GPU 0: NVIDIA H200 (UUID: GPU-1)"]}


def test_auto_backend_follows_the_hardware() -> None:
    assert prog.choose_backend("auto", facts()) == ("cpu", [])
    assert prog.choose_backend("auto", facts(nvcc="/usr/local/bin/nvcc")) == ("cpu", [])
    assert prog.choose_backend("auto", facts(**GPU, nvcc="/usr/local/cuda/bin/nvcc")) == \
        ("cuda", [])
    assert prog.choose_backend("auto", facts(platform="darwin", machine="arm64",
                                             os=["macos"])) == ("metal", [])
    # a GPU box without the toolkit is an error with its fix, never a silent CPU build
    backend, problems = prog.choose_backend("auto", facts(**GPU, os=["ubuntu", "debian"]))
    assert backend == "cuda"
    assert [(p["piece"], p["fix"]) for p in problems] == [
        ("nvcc", "sudo apt-get install -y nvidia-cuda-toolkit (or use --backend cpu)")]


def test_an_explicit_backend_names_what_it_lacks() -> None:
    backend, problems = prog.choose_backend("cuda", facts(os=["ubuntu", "debian"]))
    assert backend == "cuda"
    assert [(p["piece"], p["fix"].split(" (")[0]) for p in problems] == [
        ("driver", "sudo ubuntu-drivers install"),
        ("nvcc", "sudo apt-get install -y nvidia-cuda-toolkit")]
    backend, problems = prog.choose_backend("metal", facts())
    assert [p["piece"] for p in problems] == ["metal"]
    assert prog.choose_backend("cpu", facts(**GPU)) == ("cpu", [])


def test_preflight_gives_each_missing_piece_its_fix_for_the_os() -> None:
    assert prog.preflight(facts(), "cpu") == []
    missing = facts(compilers={"cc": "/usr/bin/cc", "cxx": None},
                    disk=[{"path": "/home", "free": 1 << 30}])
    problems = prog.preflight(missing, "cuda")
    assert [p["piece"] for p in problems] == ["compiler", "disk"]
    assert "no C++ compiler" in problems[0]["message"]
    assert problems[0]["fix"] == "sudo apt-get install -y build-essential"
    assert "needs 8 GiB" in problems[1]["message"]
    mac = prog.preflight(facts(os=["macos"], compilers={"cc": None, "cxx": None}), "metal")
    assert mac[0]["fix"] == "xcode-select --install"
    unknown = prog.preflight(facts(os=["plan9"], compilers={"cc": None, "cxx": None}), "cpu")
    assert unknown[0]["fix"] == prog.GENERIC_FIX["compiler"]


def test_cmake_args_always_add_rpc_and_let_the_user_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    assert prog.cmake_args("cpu") == "-DGGML_RPC=on"
    assert prog.cmake_args("metal") == "-DGGML_METAL=on -DGGML_RPC=on"
    assert prog.cmake_args("cuda") == \
        "-DGGML_CUDA=on -DGGML_RPC=on -DCMAKE_CUDA_ARCHITECTURES=native"
    monkeypatch.setenv("CMAKE_ARGS", "-DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_RPC=off")
    args = prog.cmake_args("cuda")
    assert args == "-DGGML_CUDA=on -DGGML_RPC=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_RPC=off"
    assert prog.RPC_OFF.search(args)  # then RPC is not required of the build


def test_a_build_is_judged_by_its_libraries_not_by_gpu_offload() -> None:
    rpc_cpu = {"version": "0.3.36", "rpc": True, "gpu_offload": True, "cuda": False,
               "metal": False}
    assert prog.build_gaps(rpc_cpu, "cpu", want_rpc=True) == []
    # an RPC build says it can offload even without CUDA: the CPU wheel from pip's cache
    assert prog.build_gaps(rpc_cpu, "cuda", want_rpc=True) == ["no cuda backend"]
    plain = {**rpc_cpu, "rpc": False, "gpu_offload": False}
    assert prog.build_gaps(plain, "cpu", want_rpc=True) == ["no RPC backend"]
    assert prog.build_gaps(plain, "cpu", want_rpc=False) == []
    assert prog.build_gaps({**rpc_cpu, "cuda": True}, "cuda", want_rpc=True) == []
    assert prog.build_gaps({"error": "llama_cpp does not load: libcuda.so.1"}, "cpu",
                           want_rpc=True) == ["llama_cpp does not load: libcuda.so.1"]


# Lines of `pip install -v` building llama-cpp-python on this machine (install.log of a cold
# `rbee hosts install`), shortened: the build env's own install, ninja's steps, pip's end.
PIP_BUILD_LOG = """\
Collecting llama-cpp-python==0.3.36
  Installing collected packages: pathspec, packaging, scikit-build-core
  Successfully installed packaging-26.4 pathspec-1.1.1 scikit-build-core-1.1.2
Collecting mdurl~=0.1 (from markdown-it-py>=2.2.0->rich>=13->rbee==0.1.0+dc92a712b479)
Building wheels for collected packages: llama-cpp-python
  Building wheel for llama-cpp-python (pyproject.toml): started
  *** scikit-build-core 1.1.2 using CMake 3.25.1 (wheel)
  [1/197] /usr/bin/g++ -DGGML_BUILD -DGGML_SCHED_MAX_COPIES=4 -DGGML_SHARED -c ggml.cpp
  [2/197] /usr/bin/gcc -DGGML_BUILD -DGGML_SCHED_MAX_COPIES=4 -DGGML_SHARED -c ggml.c
  [197/197] /usr/bin/cmake -E cmake_symlink_library vendor/llama.cpp/tools/mtmd/libmtmd.so
  Building wheel for llama-cpp-python (pyproject.toml): finished with status 'done'
  Created wheel for llama-cpp-python: filename=llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl
Successfully installed MarkupSafe-3.0.4 llama-cpp-python-0.3.36 rbee-0.1.0+dc92a712b479
"""


def test_a_real_builds_output_becomes_progress_steps(capsys: pytest.CaptureFixture[str]) -> None:
    log = io.StringIO()
    out = prog.Output(log, "Building llama-cpp-python (-DGGML_RPC=on)")
    for line in PIP_BUILD_LOG.splitlines():
        out.line(line)
    out.finish_build()
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["event"], e.get("phase")) for e in events] == [
        ("progress", "install"), ("progress", "install"), ("phase", "build"),
        ("progress", "build"), ("progress", "build"), ("progress", "build"), ("done", "build"),
        ("log", None)]
    assert events[1]["message"] == "Installing rbee: Collecting mdurl~=0.1"
    assert events[2] == {"event": "phase", "phase": "build", "unit": "steps",
                         "message": "Building llama-cpp-python (-DGGML_RPC=on)"}
    assert [(e["completed"], e["total"]) for e in events[3:6]] == [(1, 197), (2, 197),
                                                                   (197, 197)]
    assert events[-1]["message"].startswith("Successfully installed MarkupSafe")
    assert log.getvalue() == PIP_BUILD_LOG  # every line kept for install.log


def test_what_a_rerun_does() -> None:
    opts = {"version": "0.1.0+b", "schema": 1, "upgrade": False, "backend": "auto"}
    same = {"version": "0.1.0+b", "schema": 1, "backend": "cpu"}
    old = {**same, "version": "0.1.0+a"}
    assert prog.decide(None, False, opts, "cpu") == ("install", [])
    assert prog.decide(same, False, opts, "cpu") == ("install", [])  # its rbee-hive is gone
    assert prog.decide(same, True, opts, "cpu") == ("none", [])
    assert prog.decide(old, True, opts, "cpu") == ("none", ["version"])  # says --upgrade
    assert prog.decide(old, True, {**opts, "upgrade": True}, "cpu") == ("upgrade", ["version"])
    assert prog.decide({**old, "schema": 0}, True, opts, "cpu") == ("upgrade", ["version"])
    assert prog.decide(same, True, opts, "cuda") == ("none", ["backend"])  # auto found a GPU
    assert prog.decide(same, True, {**opts, "backend": "cuda"}, "cuda") == \
        ("upgrade", ["backend"])


def test_the_remote_command_is_constant_and_shell_neutral() -> None:
    command = remote_command()
    assert "\\" not in command  # fish reads backslashes even inside single quotes
    assert command.startswith("sh -c '") and command.endswith("'")


def bootstrap(tmp_path: Path, python: str | None) -> dict[str, Any]:
    """Run the remote command line with a PATH holding only sh (and maybe one python3)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sh").symlink_to("/bin/sh")
    if python:
        (bin_dir / "python3").symlink_to(python)
    host = HostConfig(name="h", ssh="h", env={"PATH": str(bin_dir),
                                               "RBEE_HOME": str(tmp_path / "home")})
    stdin = program_input(host, build_wheel(), InstallOptions())
    proc = subprocess.run(["/bin/sh", "-c", remote_command()], input=stdin,
                          capture_output=True, env={"PATH": str(bin_dir)}, timeout=60)
    assert proc.returncode == 1, proc
    last = json.loads(proc.stdout.decode().splitlines()[-1])
    assert last["event"] == "error", proc
    assert not (tmp_path / "home").exists()  # nothing written
    return dict(last["error"])


def test_no_python_on_the_host_is_a_preflight_error(tmp_path: Path) -> None:
    err = bootstrap(tmp_path, None)
    assert err["code"] == "PREFLIGHT_FAILED" and "no Python 3" in err["message"]
    assert "python3-venv" in err["hint"]


OLD_PYTHON = Path("~/.pyenv/versions/3.9.18/bin/python3.9").expanduser()


@pytest.mark.skipif(not OLD_PYTHON.exists(), reason="needs pyenv's Python 3.9 on this machine")
def test_a_too_old_python_runs_the_program_to_say_so(tmp_path: Path) -> None:
    err = bootstrap(tmp_path, str(OLD_PYTHON))
    assert err["code"] == "PREFLIGHT_FAILED"
    pieces = {p["piece"]: p for p in err["details"]["missing"]}
    assert set(pieces) == {"python", "compiler"}  # the PATH hides the compilers too
    assert "Python 3.9.18" in pieces["python"]["message"]
    assert "too old" in pieces["python"]["message"]


def test_set_hive_edits_one_line_and_keeps_the_rest(rbee_env: Env) -> None:
    path = rbee_env.config / "hosts.toml"
    path.write_text('# my lab\n[hosts.a]\nssh = "a"  # the attic\nhive = "old"  # keep me\n\n'
                    '# the next one\n[hosts.b]\nssh = "b"\n')
    assert set_hive("a", "/x/venv/bin/rbee-hive") is True
    assert set_hive("b", "/y/rbee-hive") is True
    assert path.read_text() == (
        '# my lab\n[hosts.a]\nssh = "a"  # the attic\nhive = "/x/venv/bin/rbee-hive"  '
        '# keep me\n\n# the next one\n[hosts.b]\nhive = "/y/rbee-hive"\nssh = "b"\n')
    assert set_hive("a", "/x/venv/bin/rbee-hive") is False
    assert get_host("b").hive == "/y/rbee-hive"


def test_install_refuses_what_it_cannot_do(rbee_env: Env) -> None:
    with pytest.raises(UsageError, match="--all"):
        install_hosts([], InstallOptions())
    with pytest.raises(UsageError, match="this machine"):
        install_hosts(["localhost"], InstallOptions())
    with pytest.raises(UsageError, match="choose auto, cpu, cuda, metal"):
        install_hosts(["x"], InstallOptions(backend="rocm"))
    with pytest.raises(UsageError, match="no SSH hosts"):
        install_hosts([], InstallOptions(), all_hosts=True)
    with pytest.raises(UsageError, match="--env goes with --ssh"):
        install_hosts(["x"], InstallOptions(), env=["HF_TOKEN=x"])
    with pytest.raises(UsageError, match="one NAME"):
        install_hosts(["x", "y"], InstallOptions(), ssh="me@x")
    with pytest.raises(UsageError, match=r"already in hosts\.toml, otherwise"):
        install_hosts(["localhost"], InstallOptions(), ssh="me@x")
