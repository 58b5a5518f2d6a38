"""rbee-hive git status | pull, on a real clone of a real (local, bare) repository."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import Env
from tests.helpers import error_of, run


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True,
                          text=True, env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                                          "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
                                          "HOME": str(cwd), "PATH": "/usr/bin:/bin"}).stdout


def test_status_then_pull_fast_forwards(rbee_env: Env) -> None:
    origin, work, checkout = (rbee_env.root / n for n in ("origin.git", "work", "checkout"))
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    subprocess.run(["git", "clone", "-q", str(origin), str(work)], check=True)
    (work / "README.md").write_text("one\n")
    git(work, "add", ".")
    git(work, "commit", "-qm", "one")
    git(work, "push", "-q", "origin", "HEAD:main")
    subprocess.run(["git", "clone", "-q", str(origin), str(checkout)], check=True)
    env = {"RBEE_CHECKOUT": str(checkout)}

    st = run("rbee-hive", "git", "status", "--format", "json", env=env)
    assert st.returncode == 0, st
    doc = st.json()
    assert doc["schema"] == "rbee.hive.git/v1" and doc["branch"] == "main"
    assert (doc["ahead"], doc["behind"], doc["dirty"]) == (0, 0, False)

    (work / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    git(work, "add", ".")
    git(work, "commit", "-qm", "two")
    git(work, "push", "-q", "origin", "HEAD:main")
    git(checkout, "fetch", "-q")
    assert run("rbee-hive", "git", "status", "--format", "json", env=env).json()["behind"] == 1

    pulled = run("rbee-hive", "git", "pull", "--format", "json", env=env)
    assert pulled.returncode == 0, pulled
    doc = pulled.json()
    assert doc["updated"] is True and doc["changed_files"] == ["pyproject.toml"]
    assert doc["reinstall_needed"] is True and doc["behind"] == 0
    assert doc["after"] == git(work, "rev-parse", "HEAD").strip()
    text = run("rbee-hive", "git", "pull", env=env)
    assert text.returncode == 0 and "already up to date" in text.stdout


def test_not_a_checkout_is_a_clear_error(rbee_env: Env) -> None:
    r = run("rbee-hive", "git", "status", "--format", "json",
            env={"RBEE_CHECKOUT": str(rbee_env.root)})
    assert r.returncode == 1
    err = error_of(r)
    assert err["code"] == "GIT_FAILED" and "pip" in err["hint"]
