"""Where rbee keeps things, read from the environment at call time (so tests set a variable)."""

from __future__ import annotations

import os
from pathlib import Path


def rbee_home() -> Path:
    """State dir of a hive host: models/, workers/, downloads/."""
    return Path(os.environ.get("RBEE_HOME") or "~/.local/share/rbee").expanduser()


def config_dir() -> Path:
    """Config dir of a controller (and of a hive for its user catalog)."""
    return Path(os.environ.get("RBEE_CONFIG_DIR") or "~/.config/rbee").expanduser()


def repo_root() -> Path:
    """The directory rbee's packages sit in: a git checkout for an editable install."""
    return Path(__file__).resolve().parent.parent
