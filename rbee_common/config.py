"""TOML config files read into pydantic models; every failure names the file and the line."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from rbee_common.errors import ConfigInvalid

T = TypeVar("T")

_AT_LINE = re.compile(r"\(at line (\d+), column (\d+)\)")


def load_toml(path: Path) -> tuple[dict[str, Any], str]:
    """Parse `path`; return the data and the text (kept to locate validation errors)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigInvalid(f"{path}: not UTF-8 text ({e.reason})", file=str(path)) from e
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as e:
        m = _AT_LINE.search(str(e))
        line = int(m.group(1)) if m else None
        reason = _AT_LINE.sub("", str(e)).strip()
        where = f"{path}:{line}" if line else str(path)
        raise ConfigInvalid(f"{where}: {reason}", file=str(path), line=line) from e


def validate(model: type[T], data: Any, path: Path, text: str) -> T:
    """Validate `data` with a pydantic model; report the first problem with its line."""
    from pydantic import ValidationError

    try:
        return model.model_validate(data)  # type: ignore[attr-defined,no-any-return]
    except ValidationError as e:
        first = e.errors()[0]
        loc = tuple(first["loc"])
        line = locate_line(text, loc)
        field = ".".join(str(p) for p in loc)
        where = f"{path}:{line}" if line else str(path)
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigInvalid(
            f"{where}: {field}: {message}", file=str(path), line=line, field=field
        ) from e


def _header_lines(lines: list[str], dotted: str, array: bool) -> list[int]:
    parts = [re.escape(p) for p in dotted.split(".")]
    name = r"\s*\.\s*".join(rf"(?:{p}|\"{p}\"|'{p}')" for p in parts)
    pattern = rf"^\s*\[\[\s*{name}\s*\]\]" if array else rf"^\s*\[\s*{name}\s*\](?!\])"
    return [n for n, line in enumerate(lines) if re.match(pattern, line)]


def locate_line(text: str, loc: tuple[Any, ...]) -> int | None:
    """Best-effort 1-based line of a validation error at `loc` (e.g. ("models", 2, "source"))."""
    lines = text.splitlines()
    start = None
    rest: tuple[Any, ...] = ()
    if len(loc) >= 2 and isinstance(loc[1], int):
        heads = _header_lines(lines, str(loc[0]), array=True)
        if loc[1] < len(heads):
            start, rest = heads[loc[1]], loc[2:]
    else:
        for k in range(len(loc), 0, -1):
            heads = _header_lines(lines, ".".join(str(p) for p in loc[:k]), array=False)
            if heads:
                start, rest = heads[0], loc[k:]
                break
    if start is None:
        return None
    key = next((str(p) for p in rest if not isinstance(p, int)), None)
    if key:
        for n in range(start + 1, len(lines)):
            if re.match(r"^\s*\[", lines[n]):
                break
            if re.match(rf"^\s*(?:{re.escape(key)}|\"{re.escape(key)}\")\s*=", lines[n]):
                return n + 1
    return start + 1


def toml_string(value: str) -> str:
    """A TOML basic string; JSON's escapes are a subset of TOML's when non-ASCII is kept
    (and DEL, which JSON leaves as it is and TOML refuses, is escaped too)."""
    import json

    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def env_number(name: str, default: float, *, minimum: float = 0, integer: bool = True,
               environ: dict[str, str] | None = None) -> float:
    """A number from an RBEE_* variable, checked where it is read: CONFIG_INVALID naming the
    variable and the value when it is not a number or is below `minimum`."""
    import os

    raw = (os.environ if environ is None else environ).get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        value = None
    if value is None or value < minimum or value != value:  # NaN is never a setting
        kind = "a whole number" if integer else "a number"
        raise ConfigInvalid(f"{name}={raw!r}: expected {kind} ≥ {minimum:g}",
                            hint=f"Fix or unset {name} (in the environment, or in the host's "
                                 "env in hosts.toml).", variable=name)
    return value
