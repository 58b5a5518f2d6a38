"""Read a remote GGUF's header (not the file) to estimate a model no host has yet."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import Any

from rbee_common.ggufmeta import NotAGguf, read_gguf
from rbee_common.models import HfSource, Source, UrlSource, shards

HEADER_BYTES = 16 * 1024 * 1024  # more than any GGUF header, tokenizer included


class _Chunks(io.RawIOBase):
    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            self._buf = next(self._chunks, b"")
            if not self._buf:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _url(source: Source) -> tuple[str, dict[str, str]]:
    if isinstance(source, HfSource):
        endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
        headers = {}
        if os.environ.get("HF_TOKEN"):
            headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
        return f"{endpoint}/{source.repo}/resolve/{source.revision}/{source.path}", headers
    assert isinstance(source, UrlSource)
    return source.url, {}


def probe(source: Source, timeout: float = 10.0) -> dict[str, Any] | None:
    """size, data_offset, kv_per_token, context_length of a remote GGUF; None if unreadable.

    A model in several files (gguf-split) is read file by file, in parallel: its size and
    data offset are the totals (what the estimate needs), its other facts the first file's.
    """
    if not isinstance(source, HfSource | UrlSource):
        return None
    files = shards(source)
    if len(files) == 1:
        return _probe_one(source, timeout)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, len(files))) as pool:
        headers = list(pool.map(lambda f: _probe_one(f, timeout), files))
    if any(h is None for h in headers):
        return None
    first = dict(headers[0] or {})
    first["size"] = sum(h["size"] for h in headers if h)
    first["data_offset"] = sum(h["data_offset"] for h in headers if h)
    return first


def _probe_one(source: Source, timeout: float) -> dict[str, Any] | None:
    import httpx

    url, headers = _url(source)
    try:
        # httpx drops Authorization when a redirect leaves the Hub's host
        with httpx.stream("GET", url, headers={**headers, "Accept-Encoding": "identity",
                                               "Range": f"bytes=0-{HEADER_BYTES - 1}"},
                          follow_redirects=True, timeout=timeout) as r:
            if r.status_code == 206:
                total = r.headers.get("content-range", "").rpartition("/")[2]
            elif r.status_code == 200:
                total = r.headers.get("content-length", "")
            else:
                return None
            if not total.isdigit():
                return None
            info = read_gguf(io.BufferedReader(_Chunks(r.iter_raw()), 1 << 16))
            return {"size": int(total), "data_offset": info.data_offset,
                    "kv_per_token": info.kv_per_token, "context_length": info.context_length}
    except (httpx.HTTPError, OSError, ValueError, NotAGguf):
        return None  # no estimate: placement goes on, and the hive will say what is wrong
