"""The program `rbee hosts install` runs on a host: standard library only, any Python 3.7+.

It arrives over SSH's stdin, never on the command line: first one JSON header line (the
host's env from hosts.toml, secrets included; the options; the sizes of what follows), then
this program's source, then the wheel of the controller's rbee. It speaks rbee-hive's
`--format ndjson`: progress events on stdout, then one `result` or `error` line.

Order of work: apply the env, look at the host (Python, compilers, GPU, disk), decide what to
do; only when something must be done and the preflight found nothing missing is anything
written. The venv lives under the prefix (default `$RBEE_HOME`), llama-cpp-python is built
with the flags its backend needs (RPC always), and what was installed is recorded beside the
venv, so the next run can tell "up to date" from "outdated".
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

STAMP = "rbee-install.json"
LOG = "install.log"
GIB = 1 << 30
# room for the venv and a build tree: a CUDA build of llama.cpp takes several GiB on the way
DISK_NEEDED = {"cpu": 2 * GIB, "metal": 2 * GIB, "cuda": 8 * GIB}
MIN_PYTHON = (3, 11)
BUILD_STEP = re.compile(r"^\s*\[(\d+)/(\d+)\]\s")
RPC_OFF = re.compile(r"-DGGML_RPC=(off|0|no|false)\b", re.IGNORECASE)
TAIL_LINES = 25

# The command that fixes each missing piece, by OS (the first of the host's os-release ID and
# ID_LIKE that has an entry; "macos" on a Mac).
FIXES = {
    "python": {
        "ubuntu": "sudo apt-get install -y python3.12 python3.12-venv",
        "debian": "sudo apt-get install -y python3 python3-venv",
        "fedora": "sudo dnf install -y python3.12",
        "rhel": "sudo dnf install -y python3.12",
        "arch": "sudo pacman -S --needed python",
        "suse": "sudo zypper install -y python312",
        "alpine": "sudo apk add python3",
        "macos": "brew install python@3.12",
    },
    "venv": {
        "ubuntu": "sudo apt-get install -y python{v}-venv",
        "debian": "sudo apt-get install -y python{v}-venv",
    },
    "compiler": {
        "debian": "sudo apt-get install -y build-essential",
        "fedora": "sudo dnf install -y gcc gcc-c++ make",
        "rhel": "sudo dnf install -y gcc gcc-c++ make",
        "arch": "sudo pacman -S --needed base-devel",
        "suse": "sudo zypper install -y gcc gcc-c++ make",
        "alpine": "sudo apk add build-base",
        "macos": "xcode-select --install",
    },
    "nvcc": {
        "debian": "sudo apt-get install -y nvidia-cuda-toolkit",
        "fedora": "sudo dnf install -y cuda-toolkit",
        "rhel": "sudo dnf install -y cuda-toolkit",
        "arch": "sudo pacman -S --needed cuda",
    },
    "driver": {
        "ubuntu": "sudo ubuntu-drivers install",
        "debian": "sudo apt-get install -y nvidia-driver",
        "fedora": "sudo dnf install -y akmod-nvidia",
        "arch": "sudo pacman -S --needed nvidia",
    },
}
GENERIC_FIX = {
    "python": "install Python 3.11 or newer with its venv module (python.org, or `uv python "
              "install 3.12`)",
    "venv": "install your Python's venv module (ensurepip)",
    "compiler": "install a C and C++ compiler (gcc and g++, or clang)",
    "nvcc": "install the CUDA toolkit (https://developer.nvidia.com/cuda-downloads)",
    "driver": "install the NVIDIA driver (https://www.nvidia.com/drivers)",
}

# Run in the new venv: what the installed llama-cpp-python was built with, by the worker's own
# rule (an RPC build says it can offload even without a GPU backend: read its libraries).
PROBE = (
    "import json, llama_cpp\n"
    "from worker.launch import build_backends\n"
    "b = build_backends()\n"
    "print(json.dumps({'version': llama_cpp.__version__,\n"
    "                  'rpc': bool(llama_cpp.llama_supports_rpc()),\n"
    "                  'gpu_offload': bool(llama_cpp.llama_supports_gpu_offload()),\n"
    "                  'cuda': bool(b['cuda']), 'metal': bool(b['metal'])}))\n"
)


class Failure(Exception):
    """An error to report as rbee's error envelope (code, message, hint, details)."""

    def __init__(self, code: str, message: str, hint: str = "", **details: object) -> None:
        super().__init__(message)
        self.code, self.message, self.hint, self.details = code, message, hint, details


def emit(doc: dict) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def phase(name: str, message: str, **extra: object) -> None:
    emit({"event": "phase", "phase": name, "message": message, **extra})


def done(name: str) -> None:
    emit({"event": "done", "phase": name})


# What the host has


def os_ids() -> list[str]:
    """The host's OS as keys of FIXES: ["macos"], or os-release's ID then its ID_LIKE."""
    if sys.platform == "darwin":
        return ["macos"]
    ids: list[str] = []
    try:
        with open("/etc/os-release") as f:
            for line in f:
                key, _, value = line.strip().partition("=")
                if key in ("ID", "ID_LIKE"):
                    ids += value.strip().strip('"').split()
    except OSError:
        pass
    return ["suse" if "suse" in i else i for i in ids]


def fix_for(piece: str, ids: list[str], **fmt: str) -> str:
    for i in ids:
        if i in FIXES.get(piece, {}):
            return FIXES[piece][i].format(**fmt)
    return GENERIC_FIX[piece]


def which_first(*names: str) -> str | None:
    for name in names:
        if name:
            found = shutil.which(name)
            if found:
                return found
    return None


def find_nvcc() -> str | None:
    found = which_first(os.environ.get("CUDACXX", ""), "nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"  # the toolkit's own install, often not on PATH
    return default if os.access(default, os.X_OK) else None


def nvidia_gpus() -> tuple[str | None, list[str], str]:
    """(nvidia-smi's path, the GPUs it lists, why it listed none)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None, [], "no nvidia-smi"
    try:
        proc = subprocess.run([smi, "-L"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return smi, [], str(e)
    gpus = [line.strip() for line in proc.stdout.splitlines() if line.startswith("GPU ")]
    return smi, gpus, "" if gpus else (proc.stdout.strip() or f"exit {proc.returncode}")


def has_venv() -> bool:
    try:
        import ensurepip  # noqa: F401  (Debian ships it apart, in pythonX.Y-venv)
        import venv  # noqa: F401
    except ImportError:
        return False
    return True


def existing(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def disk(prefix: str) -> list[dict]:
    """Free bytes where the venv goes and where builds run (once per filesystem)."""
    out, seen = [], set()
    for path in (existing(prefix), tempfile.gettempdir()):
        try:
            dev = os.stat(path).st_dev
            free = shutil.disk_usage(path).free
        except OSError:
            continue
        if dev not in seen:
            seen.add(dev)
            out.append({"path": path, "free": free})
    return out


def inspect(prefix: str) -> dict:
    """Everything the preflight and the backend choice look at."""
    smi, gpus, why = nvidia_gpus()
    return {
        "os": os_ids(),
        "platform": sys.platform,
        "machine": platform.machine(),
        "python": {"path": sys.executable, "version": platform.python_version(),
                   "venv": has_venv()},
        "compilers": {"cc": which_first(os.environ.get("CC", ""), "cc", "gcc", "clang"),
                      "cxx": which_first(os.environ.get("CXX", ""), "c++", "g++", "clang++")},
        "nvidia_smi": smi,
        "gpus": gpus,
        "gpus_missing_reason": why,
        "nvcc": find_nvcc(),
        "disk": disk(prefix),
    }


# What to do


def problem(piece: str, message: str, fix: str) -> dict:
    return {"piece": piece, "message": message, "fix": fix}


def choose_backend(requested: str, found: dict) -> tuple[str, list[dict]]:
    """The backend to build for, and what is missing for it.

    auto: macOS on arm64 is metal; a host whose nvidia-smi lists a GPU is cuda (and then
    needs nvcc: a GPU box silently given a CPU build would be a trap); anything else cpu.
    """
    ids = found["os"]
    has_gpu = bool(found["gpus"])
    if requested == "auto":
        if found["platform"] == "darwin" and found["machine"] == "arm64":
            requested = "metal"
        elif has_gpu:
            requested = "cuda"
        else:
            return "cpu", []
    problems = []
    if requested == "metal" and found["platform"] != "darwin":
        problems.append(problem("metal", "Metal needs macOS; this host runs "
                                f"{found['platform']}", "use --backend cpu (or cuda)"))
    if requested == "cuda":
        if not has_gpu:
            what = ("no nvidia-smi (the NVIDIA driver)" if found["nvidia_smi"] is None
                    else f"nvidia-smi lists no GPU ({found['gpus_missing_reason']})")
            problems.append(problem("driver", f"a CUDA build needs an NVIDIA GPU and driver: "
                                    f"{what}", fix_for("driver", ids)))
        if found["nvcc"] is None:
            problems.append(problem(
                "nvcc", "a CUDA build needs the CUDA toolkit: no nvcc on the PATH or in "
                "/usr/local/cuda/bin", fix_for("nvcc", ids) + " (or use --backend cpu)"))
    return requested, problems


def preflight(found: dict, backend: str) -> list[dict]:
    """Everything missing for an install with `backend`, each with the command that fixes it."""
    ids = found["os"]
    problems = []
    py = found["python"]
    if sys.version_info[:2] < MIN_PYTHON:
        problems.append(problem("python", f"Python {py['version']} at {py['path']} is too "
                                "old: rbee needs 3.11 or newer", fix_for("python", ids)))
    elif not py["venv"]:
        v = "{}.{}".format(*sys.version_info[:2])
        problems.append(problem("venv", f"Python {py['version']} at {py['path']} has no venv "
                                "module (ensurepip)", fix_for("venv", ids, v=v)))
    missing = [label for k, label in (("cc", "C"), ("cxx", "C++")) if not found["compilers"][k]]
    if missing:
        names = " and ".join(missing)
        problems.append(problem("compiler", f"no {names} compiler on the PATH (llama.cpp is "
                                "built from source)", fix_for("compiler", ids)))
    need = DISK_NEEDED.get(backend, DISK_NEEDED["cpu"])
    for d in found["disk"]:
        if d["free"] < need:
            problems.append(problem(
                "disk", f"{d['free'] / GIB:.1f} GiB free under {d['path']}; a {backend} "
                f"install needs {need / GIB:.0f} GiB", "free some space there, or give "
                "--prefix on a larger disk (TMPDIR in the host's env moves the build)"))
    return problems


def cmake_args(backend: str) -> str:
    """The flags llama-cpp-python is built with: RPC always, plus the backend's; the user's
    own CMAKE_ARGS (the host's env) come last, so they win."""
    ours = ["-DGGML_RPC=on"]
    user = os.environ.get("CMAKE_ARGS", "").strip()
    if backend == "cuda":
        ours.insert(0, "-DGGML_CUDA=on")
        if "CMAKE_CUDA_ARCHITECTURES" not in user:
            ours.append("-DCMAKE_CUDA_ARCHITECTURES=native")  # the host's GPUs only: faster
    elif backend == "metal":
        ours.insert(0, "-DGGML_METAL=on")
    return " ".join([*ours, user]).strip()


def read_stamp(venv: str) -> dict | None:
    try:
        with open(os.path.join(venv, STAMP)) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def decide(before: dict | None, hive_ok: bool, opts: dict, backend: str) -> tuple[str, list]:
    """("install" | "upgrade" | "none", what differs from the wanted install)."""
    if before is None or not hive_ok:
        return "install", []
    differs = []
    if before.get("version") != opts["version"]:
        differs.append("version")
    if before.get("backend") != backend:
        differs.append("backend")
    if not differs:
        return "none", []
    if before.get("schema") != opts["schema"]:
        return "upgrade", differs  # it cannot talk to this controller anyway
    if opts["upgrade"] or ("backend" in differs and opts["backend"] != "auto"):
        return "upgrade", differs
    return "none", differs


# Doing it


class Output:
    """A child's output: all of it to the install log, the tail kept for an error message,
    build steps as progress, a few notable lines as narration."""

    def __init__(self, log: object, build_label: str) -> None:
        self.log = log
        self.tail: list[str] = []
        self.build_label = build_label
        self.building = False

    def line(self, text: str) -> None:
        self.log.write(text + "\n")  # type: ignore[attr-defined]
        self.tail = [*self.tail[-(TAIL_LINES - 1):], text]
        step = BUILD_STEP.match(text)
        stripped = text.strip()
        if step:
            completed, total = int(step.group(1)), int(step.group(2))
            if not self.building:
                self.building = True
                phase("build", self.build_label, total=total, unit="steps")
            emit({"event": "progress", "phase": "build", "completed": completed,
                  "total": total})
        elif stripped.startswith("Building wheel for llama") and not self.building:
            self.building = True
            phase("build", self.build_label, unit="steps")
        elif stripped.startswith("Created wheel for llama"):
            self.finish_build()
        elif text.startswith("Successfully installed"):  # pip's own, not a build env's
            self.finish_build()
            emit({"event": "log", "message": stripped})
        elif stripped.startswith("Collecting "):
            what = re.sub(r" [(]from .*[)]$", "", stripped)
            emit({"event": "progress", "phase": "install", "completed": 0,
                  "message": f"Installing rbee: {what}"})

    def finish_build(self) -> None:
        if self.building:
            self.building = False
            done("build")


def run_logged(argv: list, env: dict, out: Output) -> int:
    out.log.write("$ " + " ".join(argv) + "\n")  # type: ignore[attr-defined]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, text=True, errors="replace",
                            bufsize=1)
    assert proc.stdout is not None
    for raw in proc.stdout:
        out.line(raw.rstrip("\n"))
    code = proc.wait()
    out.finish_build()
    return code


def probe(python: str) -> dict:
    proc = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"llama_cpp does not load: {last}"}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def build_gaps(got: dict, backend: str, want_rpc: bool) -> list[str]:
    """What the installed llama-cpp-python lacks for `backend` (empty: it is right)."""
    if "error" in got:
        return [got["error"]]
    gaps = []
    if want_rpc and not got["rpc"]:
        gaps.append("no RPC backend")
    if backend in ("cuda", "metal") and not (got[backend] and got["gpu_offload"]):
        gaps.append(f"no {backend} backend")
    return gaps


def pip_failed(what: str, code: int, out: Output, log_path: str) -> Failure:
    lines = [t for t in out.tail if t.strip()][-8:]
    return Failure("INSTALL_FAILED", f"{what} failed (exit {code}): " + " | ".join(lines),
                   hint=f"The whole output is in {log_path} on the host.",
                   log=log_path, tail=out.tail)


def install(prefix: str, found: dict, backend: str, opts: dict, wheel: bytes) -> dict:
    """Create or update the venv under `prefix`; the stamp of what is installed there."""
    venv = os.path.join(prefix, "venv")
    python = os.path.join(venv, "bin", "python")
    steps = []
    os.makedirs(prefix, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):  # half done must not look installed
        os.unlink(os.path.join(venv, STAMP))
    log_path = os.path.join(prefix, LOG)
    args = cmake_args(backend)
    env = dict(os.environ, CMAKE_ARGS=args, PYTHONUNBUFFERED="1", PIP_NO_INPUT="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
    if backend == "cuda" and found["nvcc"] and not shutil.which("nvcc"):
        env["CUDACXX"] = found["nvcc"]
    with open(log_path, "w") as log, tempfile.TemporaryDirectory(prefix="rbee-install-") as tmp:
        out = Output(log, f"Building llama-cpp-python ({args})")
        t0 = time.monotonic()
        if not os.access(python, os.X_OK):
            phase("venv", f"Creating a venv in {venv}")
            code = run_logged([sys.executable, "-m", "venv", "--clear", venv], env, out)
            if code != 0:
                raise pip_failed("python -m venv", code, out, log_path)
            done("venv")
            steps.append({"step": "venv", "seconds": round(time.monotonic() - t0, 1)})
        wheel_path = os.path.join(tmp, opts["wheel_name"])
        with open(wheel_path, "wb") as f:
            f.write(wheel)
        t0 = time.monotonic()
        phase("install", f"Installing rbee {opts['version']} and its dependencies")
        pip = [python, "-m", "pip", "install", "-v", "--progress-bar", "off"]
        code = run_logged([*pip, wheel_path, opts["llama"]], env, out)
        if code != 0:
            raise pip_failed("pip install", code, out, log_path)
        done("install")
        steps.append({"step": "install", "seconds": round(time.monotonic() - t0, 1)})
        want_rpc = not RPC_OFF.search(args)
        got = probe(python)
        gaps = build_gaps(got, backend, want_rpc)
        rebuilt = False
        if gaps:
            # pip's wheel cache is keyed by the sdist, not by CMAKE_ARGS: a wheel built once
            # with other flags was reused (or an older build is in the venv). Build anew.
            t0 = time.monotonic()
            emit({"event": "log", "message": f"the installed llama-cpp-python has "
                  f"{', '.join(gaps)}: rebuilding it with {args}"})
            phase("rebuild", "Rebuilding llama-cpp-python without pip's cache")
            code = run_logged([*pip, "--no-cache-dir", "--force-reinstall", "--no-deps",
                               "--no-binary", "llama-cpp-python", opts["llama"]], env, out)
            if code != 0:
                raise pip_failed("rebuilding llama-cpp-python", code, out, log_path)
            done("rebuild")
            steps.append({"step": "rebuild", "seconds": round(time.monotonic() - t0, 1)})
            rebuilt = True
            got = probe(python)
            gaps = build_gaps(got, backend, want_rpc)
            if gaps:
                raise Failure("BACKEND_UNAVAILABLE", f"llama-cpp-python built with {args} has "
                              f"{', '.join(gaps)}", hint=f"Read the build in {log_path} on "
                              "the host; or install with --backend cpu.", llama_cpp=got)
    stamp = {"version": opts["version"], "schema": opts["schema"], "backend": backend,
             "cmake_args": args, "commit": opts.get("commit"), "dirty": opts.get("dirty"),
             "python": found["python"]["version"], "installed_at": time.time(),
             "llama_cpp": {**got, "rebuilt": rebuilt}}
    tmp_stamp = os.path.join(venv, f".{STAMP}.tmp")
    with open(tmp_stamp, "w") as f:
        json.dump(stamp, f, indent=2, sort_keys=True)
    os.replace(tmp_stamp, os.path.join(venv, STAMP))
    return {"stamp": stamp, "steps": steps, "log": log_path}


def summary(stamp: dict | None) -> dict | None:
    if stamp is None:
        return None
    return {k: stamp.get(k) for k in ("version", "backend", "schema", "commit", "cmake_args",
                                      "llama_cpp")}


def main(header: dict, stdin: object) -> int:
    """Apply the env, look, decide, preflight, install; one result or error line."""
    opts = header["options"]
    wheel = stdin.read(header["wheel_bytes"])  # type: ignore[attr-defined]
    os.environ.update(header.get("env") or {})
    home = os.environ.get("RBEE_HOME") or "~/.local/share/rbee"
    prefix = os.path.abspath(os.path.expanduser(opts.get("prefix") or home))
    venv = os.path.join(prefix, "venv")
    hive = os.path.join(venv, "bin", "rbee-hive")
    phase("preflight", "Checking the host")
    found = inspect(prefix)
    backend, problems = choose_backend(opts["backend"], found)
    before = read_stamp(venv)
    action, differs = decide(before, os.access(hive, os.X_OK), opts, backend)
    done("preflight")
    result = {"prefix": prefix, "venv": venv, "hive": hive, "backend": backend,
              "found": found, "before": summary(before), "differs": differs,
              "env_keys": sorted(header.get("env") or {}), "steps": [], "log": None}
    if action == "none":
        emit({"event": "result", "result": {**result, "action": "none",
                                            "after": summary(before)}})
        return 0
    problems += preflight(found, backend)
    if problems:
        fixes = "; ".join(p["fix"] for p in problems)
        raise Failure("PREFLIGHT_FAILED", "; ".join(p["message"] for p in problems),
                      hint=f"On the host: {fixes}. Nothing was changed.", missing=problems,
                      backend=backend)
    lock = None
    os.makedirs(prefix, exist_ok=True)
    try:
        import fcntl

        lock = open(os.path.join(prefix, ".install.lock"), "w")  # noqa: SIM115
        fcntl.flock(lock, fcntl.LOCK_EX)
    except ImportError:
        pass
    try:
        did = install(prefix, found, backend, opts, wheel)
    finally:
        if lock is not None:
            lock.close()
    verb = "installed" if action == "install" else ("upgraded" if "version" in differs
                                                    else "rebuilt")
    emit({"event": "result", "result": {**result, "action": verb, "after": summary(did["stamp"]),
                                        "steps": did["steps"], "log": did["log"]}})
    return 0


def run(header: dict, stdin: object) -> int:
    try:
        return main(header, stdin)
    except Failure as e:
        emit({"event": "error", "error": {"code": e.code, "message": e.message,
                                          "hint": e.hint, "details": e.details},
              "exit_code": 1})
        return 1


if __name__ == "__rbee_install__":
    sys.exit(run(HEADER, sys.stdin.buffer))  # type: ignore[name-defined]  # noqa: F821
