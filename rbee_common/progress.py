"""Progress events from core functions, and the sinks that show them.

Core code calls `report(event)` with plain dicts, so it never knows whether a person, a
script (`--format ndjson`) or a remote controller is watching:

    {"event": "phase", "phase": "download", "message": "Downloading tinyllama",
     "total": 668788096, "unit": "bytes"}
    {"event": "progress", "phase": "download", "completed": 1048576}
    {"event": "done", "phase": "download"}
    {"event": "log", "message": "…"}
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rbee_common.output import Format, write_json
from rbee_common.textsafe import clean, safe

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

Event = dict[str, Any]
Reporter = Callable[[Event], None]


def null_reporter(event: Event) -> None:
    """Reports nothing: for --format json and for callers that only want the result."""


class NdjsonReporter:
    """One JSON object a line on stdout; progress lines are throttled to ten a second."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}

    def __call__(self, event: Event) -> None:
        if event.get("event") == "progress":
            now = time.monotonic()
            phase = str(event.get("phase"))
            if now - self._last.get(phase, 0.0) < self.interval:
                return
            self._last[phase] = now
        write_json(event)


def _amount_column() -> Any:
    """How far a task is: bytes and speed for a transfer, "12/150 steps" for a build, nothing
    while the total is unknown."""
    from rich.progress import DownloadColumn, ProgressColumn, Task, TransferSpeedColumn
    from rich.text import Text

    class AmountColumn(ProgressColumn):
        def __init__(self) -> None:
            super().__init__()
            self._bytes, self._speed = DownloadColumn(), TransferSpeedColumn()

        def render(self, task: Task) -> Text:
            unit = task.fields.get("unit", "bytes")
            if task.total is None:
                return Text("")
            if unit == "bytes":
                return Text.assemble(self._bytes.render(task), " ", self._speed.render(task))
            return Text(f"{int(task.completed)}/{int(task.total)} {clean(str(unit))}",
                        style="progress.download")

    return AmountColumn()


class RichReporter:
    """Rich bars and spinners on stderr: bytes, speed and ETA for downloads."""

    def __init__(self) -> None:
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    def _ensure(self) -> Progress:
        if self._progress is None:
            from rich.progress import (
                BarColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            from rbee_common.output import console

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                _amount_column(),
                TimeRemainingColumn(),
                TimeElapsedColumn(),
                console=console(stderr=True),
                transient=False,
            )
            self._progress.start()
        return self._progress

    def __call__(self, event: Event) -> None:
        kind = event.get("event")
        phase = str(event.get("phase", ""))
        if kind == "phase":
            progress = self._ensure()
            total = event.get("total")
            if phase in self._tasks:
                progress.update(self._tasks[phase], description=safe(event.get("message", phase)),
                                total=total)
            else:
                self._tasks[phase] = progress.add_task(
                    safe(event.get("message", phase)), total=total,
                    completed=int(event.get("completed", 0)),
                    unit=str(event.get("unit", "bytes")),
                )
        elif kind == "progress" and phase in self._tasks:
            assert self._progress is not None
            fields: dict[str, Any] = {"completed": event.get("completed", 0)}
            if event.get("total") is not None:
                fields["total"] = event["total"]
            if event.get("message"):
                fields["description"] = safe(event["message"])
            self._progress.update(self._tasks[phase], **fields)
        elif kind == "done" and phase in self._tasks:
            assert self._progress is not None
            task = self._tasks.pop(phase)
            total = self._progress.tasks[task].total
            if total is not None:
                self._progress.update(task, completed=total)
            self._progress.stop_task(task)
            if not self._tasks:
                self.close()
        elif kind == "log":
            from rbee_common.output import console

            target = self._progress.console if self._progress else console(stderr=True)
            target.print(safe(event.get("message", "")))

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._tasks.clear()


def reporter_for(fmt: Format) -> Reporter:
    """The sink a command's --format asks for; rich bars only when stderr is someone's screen."""
    if fmt is Format.ndjson:
        return NdjsonReporter()
    if fmt is Format.json:
        return null_reporter
    if sys.stderr.isatty():
        return RichReporter()
    return PlainReporter()


class PlainReporter:
    """Phase starts and ends as plain lines on stderr: what a log file or a pipe can hold."""

    def __init__(self) -> None:
        self._started: dict[str, tuple[float, str]] = {}

    def __call__(self, event: Event) -> None:
        kind = event.get("event")
        phase = str(event.get("phase", ""))
        if kind == "phase" and phase not in self._started:
            message = clean(str(event.get("message", phase)))
            self._started[phase] = (time.monotonic(), message)
            sys.stderr.write(f"{message}…\n")
        elif kind == "done" and phase in self._started:
            began, message = self._started.pop(phase)
            took = time.monotonic() - began
            done = clean(str(event.get("message") or f"{message}: done ({took:.1f}s)"))
            sys.stderr.write(f"{done}\n")
        elif kind == "log":
            sys.stderr.write(f"{clean(str(event.get('message', '')))}\n")
        sys.stderr.flush()


def close_reporter(report: Reporter) -> None:
    close = getattr(report, "close", None)
    if close is not None:
        close()
