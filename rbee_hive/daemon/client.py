"""The hive CLI's way to its host's pool daemon: every command as an HTTP call, the same
documents back. Standard library only (rbee_common.api): `rbee-hive status` runs through it.

A daemon is found by its state file and token in $RBEE_HOME. The daemon runs with the
environment it was started with; the few settings a command may take from the caller's
environment (RBEE_WORKER_BIND, RBEE_LOAD_TIMEOUT, RBEE_DOWNLOAD_RETRIES) are sent with it, so
`flag > environment > default` holds through the daemon too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from rbee_common.api import ApiClient
from rbee_common.progress import Reporter, null_reporter
from rbee_common.spawning import SpawnRequest

Doc = dict[str, Any]

# a read waits at most this long; long calls stream progress (and pings) instead
READ_TIMEOUT = 60.0


def running_daemon() -> DaemonHive | None:
    """A client of this host's running pool daemon, or None when none runs."""
    from rbee_common import daemon
    from rbee_hive.daemon import daemon_files

    files = daemon_files()
    state = daemon.running(files)
    if state is None or not state.get("local_url"):
        return None
    try:
        token = daemon.token(files)
    except daemon.DaemonNotRunning:
        return None
    return DaemonHive(ApiClient(str(state["local_url"]), token, timeout=READ_TIMEOUT))


def _env_float(name: str) -> float | None:
    value = os.environ.get(name)
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _w(wid: str) -> str:
    return "/v2/workers/" + quote(wid, safe="")


class DaemonHive:
    """rbee_hive.ops.HiveOps over the pool daemon's HTTP API."""

    def __init__(self, api: ApiClient) -> None:
        self.api = api

    def status(self) -> Doc:
        return self.api.json("GET", "/v2/state")

    def detect(self) -> Doc:
        return self.api.json("GET", "/v2/detect")

    def catalog(self) -> Doc:
        return self.api.json("GET", "/v2/models/catalog")

    def models(self) -> Doc:
        return self.api.json("GET", "/v2/models")

    def model_info(self, ref: str, ctx: int | None = None) -> Doc:
        query = {"ref": ref, **({"ctx": str(ctx)} if ctx is not None else {})}
        return self.api.json("GET", "/v2/models/info?" + urlencode(query))

    def download(self, ref: str, model_id: str | None = None, sha256: str | None = None,
                 retries: int | None = None, report: Reporter = null_reporter) -> Doc:
        if retries is None and os.environ.get("RBEE_DOWNLOAD_RETRIES", "").isdigit():
            retries = int(os.environ["RBEE_DOWNLOAD_RETRIES"])
        body = {"ref": ref, "id": model_id, "sha256": sha256, "retries": retries}
        return self.api.with_progress("POST", "/v2/models/download", body, report)

    def import_model(self, path: Path, model_id: str | None = None, copy: bool = False,
                     report: Reporter = null_reporter) -> Doc:
        # the daemon has its own working directory: send the path as this shell means it
        body = {"path": os.path.abspath(path), "id": model_id, "copy": copy}
        return self.api.with_progress("POST", "/v2/models/import", body, report)

    def verify(self, model_id: str, report: Reporter = null_reporter) -> Doc:
        return self.api.with_progress("POST", "/v2/models/verify", {"id": model_id}, report)

    def remove(self, model_id: str, force: bool = False) -> Doc:
        return self.api.json("POST", "/v2/models/rm", {"id": model_id, "force": force})

    def workers(self) -> Doc:
        return self.api.json("GET", "/v2/workers")

    def worker_health(self, wid: str) -> Doc:
        return self.api.json("GET", _w(wid) + "/health")

    def worker_logs(self, wid: str, lines: int) -> Doc:
        return self.api.json("GET", _w(wid) + f"/logs?lines={lines}")

    def follow_logs(self, wid: str, lines: int) -> Iterator[str]:
        # an idle worker may write nothing for long; the daemon's pings keep the read alive
        return self.api.lines(_w(wid) + f"/logs?lines={lines}&follow=1")

    def spawn(self, backend: str, model: str, *, device: int | Sequence[int] = 0,
              port: int | None = None, ctx: int | None = None, bind: str | None = None,
              wait: bool = True, timeout: float | None = None, token: str | None = None,
              threads: int | None = None, tensor_split: Sequence[float] | None = None,
              rpc: Sequence[str] = (), report: Reporter = null_reporter) -> Doc:
        req = SpawnRequest(backend, model, device=device, ctx=ctx, port=port,
                           bind=bind or os.environ.get("RBEE_WORKER_BIND") or None,
                           threads=threads, tensor_split=tensor_split, wait=wait,
                           timeout=timeout if timeout is not None
                           else _env_float("RBEE_LOAD_TIMEOUT"), rpc=rpc)
        body = req.body(token)
        return self.api.with_progress("POST", "/v2/workers/start", body, report)

    def stop(self, wid: str, grace: float = 10.0) -> Doc:
        return self.api.json("POST", "/v2/workers/stop", {"id": wid, "timeout": grace},
                             timeout=grace + READ_TIMEOUT)

    def stop_all(self, grace: float = 10.0) -> Doc:
        return self.api.json("POST", "/v2/workers/stop", {"all": True, "timeout": grace},
                             timeout=grace + READ_TIMEOUT)

    def worker_token(self, wid: str) -> Doc:
        return self.api.json("GET", _w(wid) + "/token")
