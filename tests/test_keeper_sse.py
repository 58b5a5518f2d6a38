"""The keeper's reader of a worker's /execute stream (rbee_keeper.worker_client._read_events),
fed real text/event-stream bytes: framed by sse-starlette exactly as the worker frames them."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from sse_starlette.sse import ServerSentEvent

from rbee_common.asgi import sse
from rbee_common.errors import RemoteError, WorkerCrashed
from rbee_keeper.worker_client import Stream, _read_events

URL = "http://127.0.0.1:8123"
END = {"tokens_out": 3, "stop_reason": "MAX_TOKENS", "prompt_tokens": 2, "ttft_ms": 4.5,
       "decode_ms": 9.1, "tokens_per_sec": 219.8}


def frame(event: str | None, data: Any) -> bytes:
    """One event as the worker puts it on the wire (its own `sse` + sse-starlette's framing)."""
    return ServerSentEvent(**sse(event, data)).encode()


PING = ServerSentEvent(comment="ping - 2026-11-02 10:00:00.000000+00:00").encode()


def read(raw: bytes) -> tuple[Stream, list[str]]:
    out, seen = Stream(job_id="j-1"), []
    _read_events(io.BytesIO(raw), out, seen.append, 0.0, URL)  # type: ignore[arg-type]
    return out, seen


def tokens(*texts: str) -> bytes:
    return b"".join(frame("token", {"t": t, "i": i}) for i, t in enumerate(texts))


def test_started_tokens_end() -> None:
    raw = (frame("started", {"job_id": "j-1", "model": "tiny"}) + tokens("ab", "c", "é€")
           + frame("end", END))
    assert raw.count(b"\r\n\r\n") == 5  # sse-starlette's CRLF framing, as the worker sends it
    out, seen = read(raw)
    assert seen == ["ab", "c", "é€"]
    assert out.text == seen and out.tokens == 3
    assert out.end == END
    assert out.ttft_ms is not None and out.ttft_ms > 0


def test_pings_between_tokens_are_ignored() -> None:
    raw = PING + tokens("a") + PING + PING + tokens("b") + frame("end", END)
    out, seen = read(raw)
    assert seen == ["a", "b"] and out.end == END


def test_plain_lf_line_endings() -> None:
    raw = (b'event: token\ndata: {"t": "x", "i": 0}\n\n'
           b'event: end\ndata: ' + json.dumps(END).encode() + b"\n\n")
    out, seen = read(raw)
    assert seen == ["x"] and out.end == END


def test_error_event_raises_the_workers_error() -> None:
    raw = tokens("a") + frame("error", {"code": "MODEL_LOAD_FAILED", "message": "it broke"})
    with pytest.raises(RemoteError) as info:
        read(raw)
    assert info.value.code == "MODEL_LOAD_FAILED" and info.value.message == "it broke"
    assert info.value.details["worker"] == URL


def test_nothing_after_end_is_read() -> None:
    stream = io.BytesIO(tokens("a") + frame("end", END) + tokens("late"))
    out, seen = Stream(job_id="j-1"), []
    _read_events(stream, out, seen.append, 0.0, URL)  # type: ignore[arg-type]
    assert seen == ["a"] and out.end == END
    assert stream.read() == tokens("late")


@pytest.mark.parametrize("tail", [b"", b"event: end\r\n", b'event: end\r\ndata: {"tokens_out"'])
def test_stream_that_ends_without_end_is_a_crash_with_the_token_count(tail: bytes) -> None:
    with pytest.raises(WorkerCrashed) as info:
        read(tokens("a", "b") + tail)
    assert info.value.code == "WORKER_CRASHED"
    assert info.value.details == {"worker": URL, "tokens": 2, "text": "ab"}
    assert "after 2 tokens" in info.value.message


def test_garbled_event_is_a_crash_not_a_hang() -> None:
    with pytest.raises(WorkerCrashed) as info:
        read(tokens("a") + b"event: token\r\ndata: {not json\r\n\r\n" + frame("end", END))
    assert info.value.details["tokens"] == 1 and "broke off" in info.value.message


def test_multi_line_data_field_is_joined_with_newlines() -> None:
    """The SSE spec joins a field's `data:` lines with "\\n"; sse-starlette writes a payload
    that holds a newline as several `data:` lines, so a JSON body spread over lines arrives
    like this."""
    payload = json.dumps({"t": "a", "i": 0}, indent=1)
    assert "\n" in payload
    raw = frame("token", payload) + frame("end", json.dumps(END, indent=1))
    assert raw.count(b"data: ") > 2
    out, seen = read(raw)
    assert seen == ["a"] and out.end == END
