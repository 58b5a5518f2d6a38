"""Heartbeat tokens: what a host's pool daemon sends its heartbeats with. A token is good for
POST /v2/heartbeat as that host and nothing else, so a host that is broken into (or one
heartbeat read off the LAN) does not give away the queen's own token: every job's prompt and
answer, every host's workers and downloads. The keeper makes one when it starts a daemon; the
queen checks it."""

from __future__ import annotations

import hashlib
import hmac

ANY_HOST = "*"  # whom the queen's own token speaks for


def heartbeat_token(queen_token: str, host: str) -> str:
    """`host.<hmac>`: the host's name, and a MAC of it under the queen's token."""
    mac = hmac.new(queen_token.encode(), f"rbee heartbeat {host}".encode(), hashlib.sha256)
    return f"{host}.{mac.hexdigest()}"


def heartbeat_sender(presented: str, queen_token: str) -> str | None:
    """Whom a heartbeat's bearer token speaks for: ANY_HOST for the queen's own token, a
    host's name for that host's heartbeat token, None for anything else."""
    if hmac.compare_digest(presented.encode(), queen_token.encode()):
        return ANY_HOST
    host, dot, _ = presented.rpartition(".")
    genuine = heartbeat_token(queen_token, host).encode()
    return host if dot and host and hmac.compare_digest(presented.encode(), genuine) else None
