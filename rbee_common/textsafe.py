"""Untrusted text on a terminal: never markup, never escape codes.

Model names, file names, URLs, log lines and generated text come from outside: a model
named `[/]` must not break rich's markup parser, and a GGUF name or a worker log line with
`ESC ]8;;…` must not plant a hyperlink or move the cursor. `safe()` is for text put into
rich markup, `cell()` for table cells, `clean()` for plain writes.
"""

from __future__ import annotations

import re
from typing import Any

# C0 controls but tab and newline, DEL and the C1 controls (ESC is \x1b, CSI may be \x9b)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(text: str) -> str:
    """Control characters shown as visible escapes (\\x1b) instead of being obeyed."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def safe(value: Any) -> str:
    """A value to interpolate into rich markup: cleaned, and its brackets escaped."""
    from rich.markup import escape

    return escape(clean(str(value)))


def cell(value: Any, style: str | None = None) -> Any:
    """A rich table cell that shows `value` literally (no markup, no control codes)."""
    from rich.text import Text

    return Text(clean("" if value is None else str(value)), style=style or "")


def for_terminal(text: str, stream: Any) -> str:
    """Untrusted text for `stream`: neutralised when a person's terminal shows it, byte-exact
    when it goes to a file or a pipe (a script's data must arrive as it was)."""
    isatty = getattr(stream, "isatty", None)
    return clean(text) if isatty is not None and isatty() else text
