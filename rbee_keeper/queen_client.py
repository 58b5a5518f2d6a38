"""Talking to the queen from the `rbee` CLI: where it is, its token, and its job API.

Standard library only (http.client): `rbee infer` through the queen must start as fast as
the daemonless warm path. The queen is used when `queen_url` is set in
`$RBEE_CONFIG_DIR/config.toml` or `RBEE_QUEEN_URL` is set; its token comes from
`RBEE_QUEEN_TOKEN`, else the file the queen keeps on this machine (queen.token), else the
`queen_token_file` of config.toml.
"""

from __future__ import annotations

import http.client
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from rbee_common.errors import ConfigInvalid, RbeeError, RemoteError, UsageError
from rbee_common.http import connect
from rbee_common.paths import config_dir
from rbee_common.sse import SseEvent, read_events


class QueenUnreachable(RbeeError):
    """The queen does not answer at its URL."""

    code = "QUEEN_UNREACHABLE"
    default_hint = "Is it running? `rbee queen status`; start it with `rbee queen start`."


@dataclass(frozen=True)
class QueenTarget:
    url: str
    token: str


def config_path() -> Path:
    return config_dir() / "config.toml"


def _config() -> dict[str, Any]:
    path = config_path()
    if not path.is_file():
        return {}
    from rbee_common.config import load_toml

    data, text = load_toml(path)
    allowed = {"queen_url", "queen_token_file"}
    for key, value in data.items():
        if key not in allowed or not isinstance(value, str):
            from rbee_common.config import locate_line

            line = locate_line(text, (key,))
            raise ConfigInvalid(f"{path}: {key}: unknown key or not a string "
                                f"(known: {', '.join(sorted(allowed))})", file=str(path),
                                line=line)
    return data


def configured_url() -> str | None:
    """The queen's URL if this controller is set up to use one (flag > env > file)."""
    url = os.environ.get("RBEE_QUEEN_URL") or _config().get("queen_url")
    if url and not url.startswith("http://") and not url.startswith("https://"):
        raise ConfigInvalid(f"queen_url {url!r} must start with http:// or https://",
                            file=str(config_path()))
    return url.rstrip("/") if url else None


def local_token() -> str | None:
    path = config_dir() / "queen.token"
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def target(url: str | None = None) -> QueenTarget:
    """Where the queen is and how to authenticate; USAGE when no queen is configured."""
    url = url or configured_url()
    if url is None:
        from rbee_common.daemon import running
        from rbee_keeper.queen.serve import queen_files

        state = running(queen_files())
        if state is None:
            raise UsageError("no queen is configured",
                             hint="Start one with `rbee queen start`, or set queen_url in "
                                  f"{config_path()} (or RBEE_QUEEN_URL).")
        url = str(state["local_url"])
    token = os.environ.get("RBEE_QUEEN_TOKEN") or local_token()
    if token is None and _config().get("queen_token_file"):
        try:
            token = Path(os.path.expanduser(_config()["queen_token_file"])).read_text().strip()
        except OSError as e:
            raise ConfigInvalid(f"queen_token_file: {e}", file=str(config_path())) from e
    if not token:
        raise UsageError("no token for the queen",
                         hint="Set RBEE_QUEEN_TOKEN (from `rbee queen token` on the queen's "
                              "machine) or queen_token_file in config.toml.")
    return QueenTarget(url.rstrip("/"), token)


class QueenClient:
    def __init__(self, t: QueenTarget, timeout: float = 30.0) -> None:
        self.target = t
        self.timeout = timeout

    def _request(self, method: str, path: str, body: Any = None,
                 timeout: float | None = None) -> tuple[http.client.HTTPResponse,
                                                       http.client.HTTPConnection]:
        conn = connect(self.target.url, timeout or self.timeout)
        headers = {"Authorization": f"Bearer {self.target.token}", "Accept": "application/json"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=payload, headers=headers)
            return conn.getresponse(), conn
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise QueenUnreachable(f"the queen at {self.target.url} does not answer: {e}",
                                   url=self.target.url) from e

    def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        resp, conn = self._request(method, path, body)
        try:
            raw = resp.read()
        finally:
            conn.close()
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            doc = {}
        if resp.status >= 400:
            if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
                err = RemoteError.from_envelope(doc)
                if resp.status == 429:
                    err.details.setdefault("retry_after", resp.getheader("Retry-After"))
                raise err
            raise RbeeError(f"the queen answered HTTP {resp.status} to {method} {path}")
        return doc if isinstance(doc, dict) else {}

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.call("POST", "/v2/tasks", body)

    def task(self, job_id: str) -> dict[str, Any]:
        return self.call("GET", f"/v2/tasks/{job_id}")

    def tasks(self, **query: Any) -> dict[str, Any]:
        q = urlencode({k: v for k, v in query.items() if v})
        return self.call("GET", "/v2/tasks" + (f"?{q}" if q else ""))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.call("POST", f"/v2/tasks/{job_id}/cancel")

    def state(self) -> dict[str, Any]:
        return self.call("GET", "/v2/state")

    def events(self, job_id: str, after: int = -1) -> Iterator[SseEvent]:
        """The job's events until its end; a dropped stream is resumed with Last-Event-ID."""
        last = after
        for attempt in range(5):
            conn = connect(self.target.url, self.timeout)
            try:
                conn.request("GET", f"/v2/tasks/{job_id}/events", headers={
                    "Authorization": f"Bearer {self.target.token}",
                    "Accept": "text/event-stream", "Last-Event-ID": str(last)})
                resp = conn.getresponse()
                if resp.status != 200:
                    raw = resp.read()
                    try:
                        raise RemoteError.from_envelope(json.loads(raw))
                    except ValueError:
                        raise RbeeError(f"the queen answered HTTP {resp.status}") from None
                if conn.sock is not None:
                    conn.sock.settimeout(None)
                for event in read_events(resp):
                    if event.id is not None:
                        last = int(event.id)
                    yield event
                    if event.event in ("end", "error"):
                        return
            except (OSError, http.client.HTTPException) as e:
                if attempt == 4:
                    raise QueenUnreachable(f"lost the queen's event stream: {e}") from e
                time.sleep(0.2 * (attempt + 1))
            finally:
                conn.close()


def follow(client: QueenClient, job_id: str, on_text: Callable[[str], None],
           on_event: Callable[[SseEvent], None] | None = None) -> dict[str, Any]:
    """Stream a job's tokens to `on_text`; its end event, or raise its error."""
    try:
        for event in client.events(job_id):
            if on_event is not None:
                on_event(event)
            if event.event == "token":
                on_text(event.json()["t"])
            elif event.event == "end":
                return dict(event.json())
            elif event.event == "error":
                data = event.json()
                raise RemoteError(str(data.get("code")), str(data.get("message")),
                                  hint=str(data.get("hint") or ""), job_id=job_id)
    except KeyboardInterrupt:
        client.cancel(job_id)
        from rbee_common.errors import Interrupted

        raise Interrupted(f"cancelled job {job_id}", hint="", job_id=job_id) from None
    raise QueenUnreachable(f"the event stream of {job_id} ended without an end event")
