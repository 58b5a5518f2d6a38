"""Reading a text/event-stream with the standard library (no client import on hot paths)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol


class LineReader(Protocol):
    def readline(self) -> bytes: ...


@dataclass(frozen=True)
class SseEvent:
    event: str
    data: str
    id: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


def read_events(stream: LineReader) -> Iterator[SseEvent]:
    """Events as they arrive: `event:`, `data:` (several lines join with "\\n"), `id:`;
    comments (`: ping`) skipped; ends when the stream does."""
    event, data, event_id = "message", [], None
    while True:
        raw = stream.readline()
        if not raw:
            return
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield SseEvent(event, "\n".join(data), event_id)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            event_id = value
