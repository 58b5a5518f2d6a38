"""docs/errors.md: every code rbee can print, read from the error classes, and up to date."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from rbee_common.errorcodes import MODULES, _classes, catalog, markdown

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rbee_common", "rbee_hive", "rbee_keeper", "worker")


def sources() -> Iterator[tuple[str, str]]:
    """(module name, source text) of every module of rbee's packages."""
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            yield ".".join(path.relative_to(ROOT).with_suffix("").parts), path.read_text()


def codes_in_source() -> set[str]:
    """Every `code = "…"` of a class, and every code written into an error document by hand."""
    found = set()
    for _, text in sources():
        found |= set(re.findall(r'^\s+code(?:: ClassVar\[str\])? = "([A-Z_]+)"', text, re.M))
        found |= set(re.findall(r'"code": "([A-Z_]{4,})"', text))
    return found


def test_every_code_in_the_source_is_in_the_catalog() -> None:
    listed = {c.code for c in catalog()}
    missing = codes_in_source() - listed
    assert not missing, f"add their modules to rbee_common.errorcodes.MODULES: {missing}"
    assert {"INSUFFICIENT_VRAM", "TUNNEL_FAILED", "DISK_FULL", "USAGE"} <= listed


def test_every_module_that_defines_an_error_class_is_read() -> None:
    """A subclass of an error class in a module the catalog does not import would go
    unlisted (its code may be its parent's, so the search for codes above misses it)."""
    names = {c.__name__ for c in _classes()} | {"RbeeError", "RemoteError"}
    unread = []
    for module, text in sources():
        for cls, bases in re.findall(r"^class (\w+)\(([^)]*)\)", text, re.M):
            if {b.strip().rsplit(".", 1)[-1] for b in bases.split(",")} & names \
                    and module not in MODULES:
                unread.append(f"{module}.{cls}")
    assert not unread, f"add their modules to rbee_common.errorcodes.MODULES: {unread}"


def test_every_code_says_what_it_means() -> None:
    for c in catalog():
        assert c.meanings, f"{c.code}: its class has no docstring"
        assert c.exit_code in (1, 2, 3, 130), c


def test_docs_errors_md_is_up_to_date() -> None:
    doc = (ROOT / "docs" / "errors.md").read_text()
    assert doc == markdown(), ("docs/errors.md is out of date: "
                               "python -m rbee_common.errorcodes > docs/errors.md")
    assert "\n## NO_PLACEMENT\n" in doc and "\n## SHARD_MISSING\n" in doc
