"""A host's hive through its pool daemon's HTTP API: the third HiveClient (after LocalHive
and SshHive), with the same typed calls and the same documents, progress and errors.

Standard library only (rbee_common.api over http.client). Commands without a typed call
(`rbee pool <command> --host NAME`) are not spoken here: rbee_keeper.hive.RoutedHive sends
them over the host's command transport, where rbee-hive itself goes through the daemon.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

from rbee_common.api import ApiClient
from rbee_common.errors import RbeeError, UsageError
from rbee_common.progress import Reporter
from rbee_keeper.hive import SpawnRequest, checked
from rbee_keeper.hosts import HostConfig

Doc = dict[str, Any]

CONNECT_TIMEOUT = 2.0
TIMEOUT = 60.0


def _w(worker_id: str) -> str:
    return "/v2/workers/" + quote(worker_id, safe="")


class HttpHive:
    """One host's pool daemon at `url`, called with its bearer `token`."""

    def __init__(self, host: HostConfig, url: str, token: str) -> None:
        self.host = host
        self.api = ApiClient(url, token, timeout=TIMEOUT,
                             connect_timeout=min(CONNECT_TIMEOUT, host.connect_timeout))

    def _doc(self, call: Callable[[], Doc]) -> Doc:
        try:
            return checked(self.host.name, call())
        except RbeeError as e:
            e.details.setdefault("host", self.host.name)
            raise

    def status(self, timeout: float | None = None) -> Doc:
        return self._doc(lambda: self.api.json("GET", "/v2/state", timeout=timeout))

    def workers(self, timeout: float | None = None) -> list[Doc]:
        doc = self._doc(lambda: self.api.json("GET", "/v2/workers", timeout=timeout))
        return list(doc["workers"])

    def download(self, ref: str, *, model_id: str | None = None, sha256: str | None = None,
                 on_event: Reporter | None = None) -> Doc:
        body = {"ref": ref, "id": model_id, "sha256": sha256}
        return self._doc(lambda: self.api.with_progress("POST", "/v2/models/download", body,
                                                        on_event))

    def spawn(self, req: SpawnRequest, token: str, on_event: Reporter | None = None) -> Doc:
        body = req.body(token)
        return self._doc(lambda: self.api.with_progress("POST", "/v2/workers/start", body,
                                                        on_event))

    def stop(self, worker_id: str, timeout: float | None = None) -> Doc:
        return self._doc(lambda: self.api.json("POST", "/v2/workers/stop", {"id": worker_id},
                                               timeout=timeout))

    def stop_all(self, timeout: float | None = None) -> Doc:
        return self._doc(lambda: self.api.json("POST", "/v2/workers/stop", {"all": True},
                                               timeout=timeout))

    def token(self, worker_id: str) -> str:
        return str(self._doc(lambda: self.api.json("GET", _w(worker_id) + "/token"))["token"])

    def logs(self, worker_id: str, lines: int = 50) -> list[str]:
        doc = self._doc(lambda: self.api.json("GET", _w(worker_id) + f"/logs?lines={lines}"))
        return list(doc["lines"])

    def follow_logs(self, worker_id: str, on_line: Callable[[str], None],
                    lines: int = 50) -> None:
        try:
            for line in self.api.lines(_w(worker_id) + f"/logs?lines={lines}&follow=1"):
                on_line(line)
        except RbeeError as e:
            e.details.setdefault("host", self.host.name)
            raise

    def command(self, args: Sequence[str], *, on_event: Reporter | None = None,
                secrets: dict[str, str] | None = None) -> Doc:
        raise UsageError(f"{self.host.name}: `rbee-hive {' '.join(args[:2])}` has no typed "
                         "call over the pool daemon's API",
                         hint="Run it over the host's command transport (RoutedHive does).")

    def lines(self, args: Sequence[str], on_line: Callable[[str], None]) -> int:
        self.command(args)  # raises: there is no such call
        return 1

    def close(self) -> None:
        pass
