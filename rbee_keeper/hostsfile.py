"""Where hosts.toml is and which hosts it names: the light part, for the warm path.

Validating the whole file (rbee_keeper.hosts, pydantic) costs more than a warm `rbee infer`
should; the warm path needs only the names.
"""

from __future__ import annotations

from pathlib import Path

from rbee_common.paths import config_dir

IMPLICIT = "localhost"


def hosts_path() -> Path:
    return config_dir() / "hosts.toml"


def host_names() -> set[str]:
    """The names in hosts.toml, or the implicit localhost when there is no file."""
    path = hosts_path()
    if not path.is_file():
        return {IMPLICIT}
    from rbee_common.config import load_toml

    data, _ = load_toml(path)
    hosts = data.get("hosts", {})
    return set(hosts) if isinstance(hosts, dict) else set()
