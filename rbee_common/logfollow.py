"""Following a log file as it grows: its last lines, then each new line until its writer is
gone. One reader for every follower (a worker's log in the CLI or over the pool daemon's
HTTP, a daemon's own log), sync or async around the same `poll()`."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

TAIL_BYTES = 64 * 1024
POLL_S = 0.2


class LogFollower:
    """History and follow meet at one offset: no line is lost or shown twice."""

    def __init__(self, path: Path, alive: Callable[[], bool]) -> None:
        self.alive = alive
        self._file: BinaryIO | None = None
        self._partial = b""
        with contextlib.suppress(FileNotFoundError):
            self._file = open(path, "rb")  # noqa: SIM115 (closed by close())

    def history(self, lines: int) -> list[str]:
        """The last `lines` lines as they are now; following starts right after them."""
        f = self._file
        if f is None or lines <= 0:
            if f is not None:
                f.seek(0, os.SEEK_END)
            return []
        end = f.seek(0, os.SEEK_END)
        f.seek(max(end - TAIL_BYTES, 0))
        text = f.read(end - f.tell()).decode("utf-8", errors="replace")
        return text.splitlines()[-lines:]

    def poll(self) -> tuple[list[str], bool]:
        """New complete lines, and whether the writer is gone (its last words included)."""
        if self._file is None:
            return [], True
        gone = not self.alive()  # check, then read: words written just before the end come
        chunk = self._file.read()
        out: list[str] = []
        if chunk:
            self._partial += chunk
            *done, self._partial = self._partial.split(b"\n")
            out = [line.decode("utf-8", errors="replace") for line in done]
        if gone and not chunk and self._partial:
            out.append(self._partial.decode("utf-8", errors="replace"))
            self._partial = b""
        return out, gone and not chunk

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def follow(path: Path, lines: int, alive: Callable[[], bool] | None) -> Iterator[str]:
    """The log's last lines, then (when `alive` is given) new lines until it returns False."""
    follower = LogFollower(path, alive or (lambda: False))
    try:
        yield from follower.history(lines)
        if alive is None:
            return
        while True:
            new, done = follower.poll()
            yield from new
            if done:
                return
            if not new:
                time.sleep(POLL_S)
    finally:
        follower.close()
