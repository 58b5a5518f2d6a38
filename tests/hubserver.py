"""A loopback HTTP server that speaks the Hugging Face resolve protocol (and plain files).

The real huggingface_hub client reaches it through HF_ENDPOINT. It records every request,
and can drop connections mid-body or throttle, so tests can prove what a resumed download
re-transferred.

    /{org}/{repo}/resolve/{revision}/{path}   HEAD and GET, Range and If-Range
    /files/{name}                             a plain https-style file (ETag, Range)
    /api/agent-harnesses                      404 (the client's best-effort probe)
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Served:
    body: bytes
    etag: str | None = None  # defaults to the body's sha256, as the Hub's LFS ETag is


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    status: int
    sent: int = 0


@dataclass
class HubState:
    repos: dict[str, dict[str, Served]] = field(default_factory=dict)  # repo → path → file
    files: dict[str, Served] = field(default_factory=dict)
    log: list[Request] = field(default_factory=list)
    drop_after: int | None = None  # close the connection after this many body bytes …
    drops_left: int = 0  # … for this many GET responses …
    drop_path: str | None = None  # … of paths ending so (None: any path)
    bytes_per_sec: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class Handler(BaseHTTPRequestHandler):
    server: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        st = self.server.state
        path = self.path.split("?", 1)[0]
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        extra: dict[str, str] = {}
        if m:
            repo, _rev, fpath = m.groups()
            if repo not in st.repos:
                return self._error(404, "RepoNotFound", head)
            served = st.repos[repo].get(fpath)
            if served is None:
                return self._error(404, "EntryNotFound", head)
            etag = served.etag or hashlib.sha256(served.body).hexdigest()
            extra = {"X-Repo-Commit": COMMIT, "X-Linked-Etag": f'"{etag}"',
                     "X-Linked-Size": str(len(served.body))}
        elif path.startswith("/files/") and path[len("/files/"):] in st.files:
            served = st.files[path[len("/files/"):]]
            etag = served.etag or hashlib.sha256(served.body).hexdigest()[:16]
        else:
            return self._error(404, "EntryNotFound", head)
        self._send_body(served.body, etag, extra, head)

    def _error(self, status: int, code: str, head: bool) -> None:
        body = b'{"error": "not found"}'
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
        self._record(status, 0)

    def _record(self, status: int, sent: int) -> Request:
        req = Request(self.command, self.path, self.headers.get("Range"), status, sent)
        with self.server.state.lock:
            self.server.state.log.append(req)
        return req

    def _send_body(self, body: bytes, etag: str, extra: dict[str, str], head: bool) -> None:
        st = self.server.state
        start, end = 0, len(body)
        status = 200
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if rng and (if_range is None or if_range.strip('"') == etag):
            m = re.match(r"bytes=(\d+)-(\d*)$", rng)
            if m:
                start = int(m.group(1))
                end = min(int(m.group(2)) + 1, len(body)) if m.group(2) else len(body)
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    self._record(416, 0)
                    return
                status = 206
        chunk = body[start:end]
        self.send_response(status)
        self.send_header("Content-Length", str(len(chunk)))
        self.send_header("ETag", f'"{etag}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(body)}")
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        if head:
            self._record(status, 0)
            return
        req = self._record(status, 0)
        limit = len(chunk)
        with st.lock:
            if st.drops_left > 0 and st.drop_after is not None and (
                    st.drop_path is None or self.path.split("?", 1)[0].endswith(st.drop_path)):
                st.drops_left -= 1
                limit = min(limit, st.drop_after)
        sent = 0
        step = 64 * 1024
        try:
            while sent < limit:
                piece = chunk[sent:min(sent + step, limit)]
                self.wfile.write(piece)
                sent += len(piece)
                req.sent = sent
                if st.bytes_per_sec:
                    time.sleep(len(piece) / st.bytes_per_sec)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return
        if limit < len(chunk):
            # a dropped connection: the client sees a body shorter than Content-Length
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True


class HubServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__((host, 0), Handler)
        self.state = HubState()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def add_repo_file(self, repo: str, path: str, body: bytes, etag: str | None = None) -> None:
        self.state.repos.setdefault(repo, {})[path] = Served(body, etag)

    def add_file(self, name: str, body: bytes) -> None:
        self.state.files[name] = Served(body)

    def drop_next(self, after_bytes: int, times: int = 1, path: str | None = None) -> None:
        """Cut the next `times` GET bodies (of files whose path ends with `path`) short."""
        self.state.drop_after, self.state.drops_left = after_bytes, times
        self.state.drop_path = path

    def gets(self) -> list[Request]:
        return [r for r in self.state.log if r.method == "GET" and r.status in (200, 206)]

    def start(self) -> HubServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
