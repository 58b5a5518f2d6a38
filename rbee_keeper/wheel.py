"""A wheel of this very rbee, built from its checkout, to ship to a host (`rbee hosts install`).

Built here, in-process, from pyproject.toml's own tables (the packages and force-include of
its hatch wheel target, the scripts, the dependencies): no build backend to download, and
the same tree always gives the same bytes. Its version carries a digest of what is in it
(`0.1.0+3f2a1c9b8d7e`), so two ends run the same code exactly when their versions are
equal, and pip replaces an installed rbee whenever the code changed.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import subprocess
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rbee_common.paths import repo_root
from rbee_keeper.errors import InstallFailed

ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed, so the same files make the same wheel
SKIP_DIRS = frozenset({"__pycache__", ".pytest_cache", ".ruff_cache"})
SKIP_SUFFIXES = (".pyc", ".pyo", ".DS_Store")


@dataclass(frozen=True)
class Wheel:
    """A built wheel in memory: what to send, and what it is."""

    name: str  # the file name pip needs: rbee-0.1.0+3f2a1c9b8d7e-py3-none-any.whl
    data: bytes
    version: str
    digest: str  # sha256 of the files and metadata (not of the zip)
    commit: str | None  # the checkout's HEAD, when it is a git checkout
    dirty: bool | None  # uncommitted changes to tracked files


def source_dir() -> Path:
    """The checkout to ship: $RBEE_CHECKOUT, else the one these packages were loaded from."""
    return Path(os.environ.get("RBEE_CHECKOUT") or repo_root())


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _files(root: Path, project: dict[str, Any], hatch: dict[str, Any]) -> dict[str, bytes]:
    """{path in the wheel: bytes}: each package's files, then force-included ones."""
    out: dict[str, bytes] = {}
    for package in hatch.get("packages", []):
        base = root / package
        if not base.is_dir():
            raise InstallFailed(f"{root}: package {package!r} named in pyproject.toml is missing")
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            for filename in sorted(filenames):
                if filename.endswith(SKIP_SUFFIXES):
                    continue
                path = Path(dirpath) / filename
                out[path.relative_to(root).as_posix()] = path.read_bytes()
    for src, dest in hatch.get("force-include", {}).items():
        out[dest] = (root / src).read_bytes()
    return out


def _metadata(project: dict[str, Any], version: str) -> str:
    lines = ["Metadata-Version: 2.1", f"Name: {project['name']}", f"Version: {version}"]
    if project.get("description"):
        lines.append(f"Summary: {project['description']}")
    if project.get("requires-python"):
        lines.append(f"Requires-Python: {project['requires-python']}")
    lines += [f"Requires-Dist: {dep}" for dep in project.get("dependencies", [])]
    for extra, deps in project.get("optional-dependencies", {}).items():
        lines.append(f"Provides-Extra: {extra}")
        lines += [f"Requires-Dist: {dep}; extra == \"{extra}\"" for dep in deps]
    return "\n".join(lines) + "\n"


def _entry_points(project: dict[str, Any]) -> str:
    scripts = project.get("scripts", {})
    body = "".join(f"{name} = {target}\n" for name, target in scripts.items())
    return f"[console_scripts]\n{body}" if body else ""


def _git(root: Path, *args: str) -> str | None:
    if not (root / ".git").exists():
        return None
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def build_wheel(root: Path | None = None) -> Wheel:
    """The wheel of the rbee checkout at `root` (default: `source_dir()`)."""
    root = root or source_dir()
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file():
        raise InstallFailed(
            f"{root} is not an rbee checkout (no pyproject.toml): there is nothing to ship",
            hint="Run rbee from a git checkout (scripts/bootstrap.sh), or point RBEE_CHECKOUT "
                 "at one.")
    config = tomllib.loads(pyproject.read_text())
    project = config["project"]
    hatch = config.get("tool", {}).get("hatch", {}).get("build", {}).get("targets", {}) \
        .get("wheel", {})
    files = _files(root, project, hatch)
    entry_points = _entry_points(project)
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(f"{path}\0{hashlib.sha256(files[path]).hexdigest()}\n".encode())
    h.update(_metadata(project, "").encode() + entry_points.encode())
    digest = h.hexdigest()
    version = f"{project['version']}+{digest[:12]}"
    dist = f"{_normalize(project['name'])}-{version}"
    info = f"{dist}.dist-info"
    meta = {
        f"{info}/METADATA": _metadata(project, version).encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: rbee\nRoot-Is-Purelib: true\n"
                         b"Tag: py3-none-any\n",
    }
    if entry_points:
        meta[f"{info}/entry_points.txt"] = entry_points.encode()
    entries = {**files, **meta}
    record = "".join(_record_line(p, d) + "\n" for p, d in entries.items())
    record += f"{info}/RECORD,,\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in [*entries.items(), (f"{info}/RECORD", record.encode())]:
            item = zipfile.ZipInfo(path, ZIP_TIME)
            item.external_attr = 0o644 << 16
            item.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(item, data)
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return Wheel(name=f"{dist}-py3-none-any.whl", data=buf.getvalue(), version=version,
                 digest=digest, commit=_git(root, "rev-parse", "HEAD"),
                 dirty=None if status is None else bool(status))
