"""Following a worker's log for an HTTP client: its last lines, then new ones until the
worker exits, polled on the event loop so an idle follower holds no thread and ends as soon
as its client goes away."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from rbee_hive.process import pid_alive
from rbee_hive.registry import Registry

POLL = 0.2
TAIL_BYTES = 64 * 1024


async def follow(wid: str, lines: int) -> AsyncIterator[str]:
    """The log's last `lines` lines, then each new line while the worker runs."""
    reg = Registry()
    record = reg.get(wid)
    try:
        f = open(reg.log_path(wid), "rb")  # noqa: SIM115 (closed below, across awaits)
    except FileNotFoundError:
        return
    try:
        # history and follow meet at one offset: no line is lost or shown twice
        end = f.seek(0, os.SEEK_END)
        f.seek(max(end - TAIL_BYTES, 0))
        history = f.read(end - f.tell()).decode("utf-8", errors="replace").splitlines()
        for line in history[-lines:] if lines > 0 else []:
            yield line
        partial = b""
        while True:
            # check, then read: last words written just before the worker ends still come
            gone = not pid_alive(record["pid"], wid)
            chunk = f.read()
            if chunk:
                partial += chunk
                *done, partial = partial.split(b"\n")
                for line in done:
                    yield line.decode("utf-8", errors="replace")
                continue
            if gone:
                if partial:
                    yield partial.decode("utf-8", errors="replace")
                return
            await asyncio.sleep(POLL)
    finally:
        f.close()
