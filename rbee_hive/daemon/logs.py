"""Following a worker's log for an HTTP client: its last lines, then new ones until the
worker exits, polled on the event loop so an idle follower holds no thread and ends as soon
as its client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from rbee_common.logfollow import POLL_S, LogFollower
from rbee_hive.process import pid_alive
from rbee_hive.registry import Registry


async def follow(wid: str, lines: int) -> AsyncIterator[str]:
    """The log's last `lines` lines, then each new line while the worker runs."""
    reg = Registry()
    record = reg.get(wid)
    follower = LogFollower(reg.log_path(wid), lambda: pid_alive(record["pid"], wid))
    try:
        for line in follower.history(lines):
            yield line
        while True:
            new, done = follower.poll()
            for line in new:
                yield line
            if done:
                return
            if not new:
                await asyncio.sleep(POLL_S)
    finally:
        follower.close()
