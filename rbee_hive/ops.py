"""What each `rbee-hive` command does, as one interface with the documents it returns.

`InProcess` does the work here, through the core modules; `DaemonHive`
(rbee_hive.daemon.client) asks this host's pool daemon to, so that while a daemon runs every
change to the registry goes through it and two clients never race. The CLI gets its
implementation from `hive()` and never knows which one it has: every command prints the same
document, with the same progress and exit code, either way. Importing this module costs
nothing: `rbee-hive status` runs through it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from rbee_common.progress import Reporter, null_reporter

Doc = dict[str, Any]


class HiveOps(Protocol):
    """The commands of one host's hive, each returning its JSON document."""

    def status(self) -> Doc: ...

    def detect(self) -> Doc: ...

    def catalog(self) -> Doc: ...

    def models(self) -> Doc: ...

    def model_info(self, ref: str, ctx: int | None = None) -> Doc: ...

    def download(self, ref: str, model_id: str | None = None, sha256: str | None = None,
                 retries: int | None = None, report: Reporter = null_reporter) -> Doc: ...

    def import_model(self, path: Path, model_id: str | None = None, copy: bool = False,
                     report: Reporter = null_reporter) -> Doc: ...

    def verify(self, model_id: str, report: Reporter = null_reporter) -> Doc: ...

    def remove(self, model_id: str, force: bool = False) -> Doc: ...

    def workers(self) -> Doc: ...

    def worker_health(self, wid: str) -> Doc: ...

    def worker_logs(self, wid: str, lines: int) -> Doc: ...

    def follow_logs(self, wid: str, lines: int) -> Iterator[str]: ...

    def spawn(self, backend: str, model: str, *, device: int | Sequence[int] = 0,
              port: int | None = None, ctx: int | None = None, bind: str | None = None,
              wait: bool = True, timeout: float | None = None, token: str | None = None,
              threads: int | None = None, tensor_split: Sequence[float] | None = None,
              rpc: Sequence[str] = (), report: Reporter = null_reporter) -> Doc: ...

    def stop(self, wid: str, grace: float = 10.0) -> Doc: ...

    def stop_all(self, grace: float = 10.0) -> Doc: ...

    def worker_token(self, wid: str) -> Doc: ...


class InProcess:
    """The commands done in this process by the core modules (no daemon involved)."""

    def status(self) -> Doc:
        from rbee_hive.status import status

        return status()

    def detect(self) -> Doc:
        from rbee_hive import documents

        return documents.detect()

    def catalog(self) -> Doc:
        from rbee_hive import documents

        return documents.catalog()

    def models(self) -> Doc:
        from rbee_hive import documents

        return documents.models()

    def model_info(self, ref: str, ctx: int | None = None) -> Doc:
        from rbee_hive import documents

        return documents.model_info(ref, ctx)

    def download(self, ref: str, model_id: str | None = None, sha256: str | None = None,
                 retries: int | None = None, report: Reporter = null_reporter) -> Doc:
        from rbee_hive import documents

        return documents.download(ref, model_id, sha256, retries, report)

    def import_model(self, path: Path, model_id: str | None = None, copy: bool = False,
                     report: Reporter = null_reporter) -> Doc:
        from rbee_hive import documents

        return documents.import_model(path, model_id, copy, report)

    def verify(self, model_id: str, report: Reporter = null_reporter) -> Doc:
        from rbee_hive import documents

        return documents.verify(model_id, report)

    def remove(self, model_id: str, force: bool = False) -> Doc:
        from rbee_hive import documents

        return documents.remove(model_id, force)

    def workers(self) -> Doc:
        from rbee_hive import documents

        return documents.workers()

    def worker_health(self, wid: str) -> Doc:
        from rbee_hive import documents

        return documents.worker_health(wid)

    def worker_logs(self, wid: str, lines: int) -> Doc:
        from rbee_hive import documents

        return documents.worker_logs(wid, lines)

    def follow_logs(self, wid: str, lines: int) -> Iterator[str]:
        from rbee_hive.worker_logs import follow_log

        return follow_log(wid, lines, True)

    def spawn(self, backend: str, model: str, *, device: int | Sequence[int] = 0,
              port: int | None = None, ctx: int | None = None, bind: str | None = None,
              wait: bool = True, timeout: float | None = None, token: str | None = None,
              threads: int | None = None, tensor_split: Sequence[float] | None = None,
              rpc: Sequence[str] = (), report: Reporter = null_reporter) -> Doc:
        from rbee_hive.spawn import spawn

        return spawn(backend, model, device=device, port=port, ctx=ctx, bind=bind, wait=wait,
                     timeout=timeout, token=token, threads=threads, tensor_split=tensor_split,
                     rpc=rpc, report=report)

    def stop(self, wid: str, grace: float = 10.0) -> Doc:
        from rbee_hive.workers import stop

        return stop(wid, grace)

    def stop_all(self, grace: float = 10.0) -> Doc:
        from rbee_hive import documents

        return documents.stop_all(grace)

    def worker_token(self, wid: str) -> Doc:
        from rbee_hive import documents

        return documents.worker_token(wid)


class DaemonFirst:
    """The pool daemon; in this process instead when nothing listens at its address (it is
    stopping, or died without clearing its state file): nothing was sent, so nothing races."""

    def __init__(self, daemon: HiveOps) -> None:
        self.daemon = daemon
        self.local = InProcess()

    def __getattr__(self, name: str) -> Any:
        via, local = getattr(self.daemon, name), getattr(self.local, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            from rbee_common.api import DaemonConnectionLost, DaemonUnreachable

            try:
                return via(*args, **kwargs)
            except DaemonConnectionLost:
                raise
            except DaemonUnreachable:
                return local(*args, **kwargs)

        return call


def hive() -> HiveOps:
    """This host's pool daemon when one runs here, else the core modules in this process."""
    from rbee_hive.daemon.client import running_daemon

    daemon = running_daemon()
    return InProcess() if daemon is None else DaemonFirst(daemon)
