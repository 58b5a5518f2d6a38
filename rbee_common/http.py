"""Small HTTP calls with the standard library: no client import on the hot paths."""

from __future__ import annotations

import http.client
import json
from typing import Any
from urllib.parse import urlsplit


def connect(url: str, timeout: float) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"not an http:// address: {url!r}")
    return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)


def request_json(url: str, path: str, *, method: str = "GET", body: Any = None,
                 token: str | None = None, timeout: float = 2.0
                 ) -> tuple[int, dict[str, Any] | None]:
    """(status, JSON body or None); (0, None) when the server cannot be reached."""
    conn = connect(url, timeout)
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    payload = None
    if body is not None:
        payload = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            doc = None
        return resp.status, doc if isinstance(doc, dict) else None
    except (OSError, http.client.HTTPException):
        return 0, None
    finally:
        conn.close()


def get_health(url: str, timeout: float = 1.0) -> dict[str, Any] | None:
    status, doc = request_json(url, "/health", timeout=timeout)
    return doc if status == 200 else None
