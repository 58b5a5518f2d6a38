"""`rbee-hive git status | pull`: keep the checkout a hive runs from up to date."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from rbee_common.paths import repo_root
from rbee_hive import schemas
from rbee_hive.errors import GitFailed


def checkout_dir() -> Path:
    """The rbee checkout: $RBEE_CHECKOUT, else the directory these packages were loaded from."""
    return Path(os.environ.get("RBEE_CHECKOUT") or repo_root())


def _git(root: Path, *args: str, check: bool = True) -> str:
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    except FileNotFoundError as e:
        raise GitFailed("git is not installed", hint="Install git.") from e
    except subprocess.TimeoutExpired as e:
        raise GitFailed(f"git {args[0]} took more than 120 s", hint="Check the network.") from e
    if check and proc.returncode != 0:
        raise GitFailed(f"git {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}",
                        hint="Resolve it in the checkout by hand, then run again.")
    return proc.stdout.strip()


def _require_checkout() -> Path:
    root = checkout_dir()
    if not (root / ".git").exists():
        raise GitFailed(f"{root} is not a git checkout",
                        hint="This rbee was installed from a package: upgrade it with pip.")
    return root


def status() -> dict[str, Any]:
    root = _require_checkout()
    upstream = _git(root, "rev-parse", "--abbrev-ref", "--symbolic-full-name", "@{u}",
                    check=False) or None
    ahead = behind = None
    if upstream:
        counts = _git(root, "rev-list", "--left-right", "--count", "@{u}...HEAD", check=False)
        if counts:
            behind, ahead = (int(x) for x in counts.split())
    return {
        "schema": schemas.GIT,
        "path": str(root),
        "branch": _git(root, "rev-parse", "--abbrev-ref", "HEAD"),
        "commit": _git(root, "rev-parse", "HEAD"),
        "dirty": bool(_git(root, "status", "--porcelain", "--untracked-files=no")),
        "upstream": upstream,
        "ahead": ahead,
        "behind": behind,
    }


def pull() -> dict[str, Any]:
    root = _require_checkout()
    before = _git(root, "rev-parse", "HEAD")
    _git(root, "pull", "--ff-only")
    after = _git(root, "rev-parse", "HEAD")
    changed = _git(root, "diff", "--name-only", before, after).splitlines() if before != after \
        else []
    reinstall = any(f in ("pyproject.toml", "setup.py", "setup.cfg") for f in changed)
    return {**status(), "before": before, "after": after, "updated": before != after,
            "changed_files": changed, "reinstall_needed": reinstall}
