"""Helpers shared by the tests: run the real console scripts, read SSE streams."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def lines(self) -> list[Any]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]

    def __repr__(self) -> str:
        return (f"Result({' '.join(self.args)!r}, rc={self.returncode},\n--- stdout\n"
                f"{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]})")


def run(cmd: str, *args: str, input: str | None = None, timeout: float = 120,
        env: dict[str, str] | None = None) -> Result:
    """Run one of rbee's console scripts as a user would: a real process."""
    argv = [str(BIN / cmd), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=timeout,
                          env={**os.environ, **(env or {})})
    return Result(argv[1:], proc.returncode, proc.stdout, proc.stderr)


def popen(cmd: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([str(BIN / cmd), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, Any]]:
    """Parse a text/event-stream into (event, data) pairs; data is JSON-decoded when it can be."""
    event, data = None, []
    for line in lines:
        if line == "":
            if data:
                text = "\n".join(data)
                try:
                    value: Any = json.loads(text)
                except ValueError:
                    value = text
                yield event or "message", value
            event, data = None, []
            continue
        if line.startswith(":"):
            continue
        name, _, value_ = line.partition(":")
        value_ = value_[1:] if value_.startswith(" ") else value_
        if name == "event":
            event = value_
        elif name == "data":
            data.append(value_)


def error_of(result: Result) -> dict[str, Any]:
    """The error envelope a command printed with --format json."""
    doc = result.json()
    assert "error" in doc, result
    return dict(doc["error"])
