"""The hive behind the pool daemon's routes: the same core functions the CLI runs, with the
calls that change the registry or the model store serialized (one at a time, whoever the
client), and the watcher told at once when a worker comes or goes.

A spawn holds the lock only while it is admitted and started (memory check, port, record);
waiting for the worker to load happens outside it, so two loads on two devices overlap.
Downloads take their own per-model lock in the core and run outside this one: a long
download never holds up a spawn.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rbee_common.progress import Reporter, null_reporter
from rbee_common.spawning import SpawnRequest
from rbee_hive.ops import InProcess

log = logging.getLogger("rbee.hive.daemon")

Doc = dict[str, Any]


REAP_TIMEOUT = 5.0  # s: a worker just stopped finishes exiting well within this


def reap(pid: int | None, timeout: float = 0.0) -> None:
    """Collect a worker this process started once it has exited, so no zombie stays behind.

    `timeout`: how long to wait for a worker that was just ended to finish exiting. A process
    tearing down already reads as gone (its command line is empty) a moment before the kernel
    makes it a zombie that can be collected; a look without waiting then misses it for good,
    as its record is gone by the next watch tick. Not our child, or already collected: no-op.
    """
    if pid is None:  # a record whose start was cut short before its pid was written
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except (ChildProcessError, OSError):
            return
        if done or time.monotonic() >= deadline:
            return
        time.sleep(0.01)


class PoolService:
    """The hive's commands as the daemon serves them."""

    def __init__(self, on_change: Callable[[], None] = lambda: None) -> None:
        self.local = InProcess()
        self.on_change = on_change
        self._mutate = threading.Lock()

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        try:
            with self._mutate:
                yield
        finally:
            self.on_change()

    # reads: as the CLI does them

    def state(self) -> Doc:
        return self.local.status()

    def detect(self) -> Doc:
        return self.local.detect()

    def catalog(self) -> Doc:
        return self.local.catalog()

    def models(self) -> Doc:
        return self.local.models()

    def model_info(self, ref: str, ctx: int | None) -> Doc:
        return self.local.model_info(ref, ctx)

    def workers(self) -> Doc:
        return self.local.workers()

    def worker_health(self, wid: str) -> Doc:
        return self.local.worker_health(wid)

    def worker_logs(self, wid: str, lines: int) -> Doc:
        return self.local.worker_logs(wid, lines)

    def worker_token(self, wid: str) -> Doc:
        return self.local.worker_token(wid)

    def verify(self, model_id: str, report: Reporter = null_reporter) -> Doc:
        return self.local.verify(model_id, report)

    # changes: one at a time

    def spawn(self, req: SpawnRequest, token: str | None = None,
              report: Reporter = null_reporter) -> Doc:
        """Admit and start a worker under the lock; wait for it to load outside it."""
        from rbee_hive.spawn import load_timeout, wait_ready

        with self._changing():
            record = self.local.spawn(req.backend, req.model, device=req.device,
                                      port=req.port, ctx=req.ctx, bind=req.bind, wait=False,
                                      token=token, threads=req.threads,
                                      tensor_split=req.tensor_split, rpc=req.rpc)
        log.info("worker %s started: %s on %s:%s, port %s, pid %s", record["id"],
                 record["model"], record["backend"], record["device"], record["port"],
                 record["pid"])
        if not req.wait:
            return record
        try:
            ready = wait_ready(record, None, req.timeout or load_timeout(), report)
        except Exception as e:
            log.warning("worker %s did not become ready: %s", record["id"], e)
            raise
        finally:
            self.on_change()
        log.info("worker %s ready in %ss", ready["id"], ready.get("ready_s"))
        return ready

    def stop(self, wid: str, grace: float) -> Doc:
        from rbee_hive.registry import Registry

        with self._changing():
            pid = Registry().get(wid)["pid"]
            doc = self.local.stop(wid, grace)
            reap(pid, REAP_TIMEOUT)
        log.info("worker %s stopped (%s)", wid, doc.get("signal") or "was not running")
        return doc

    def stop_all(self, grace: float) -> Doc:
        from rbee_hive.registry import Registry

        with self._changing():
            pids = [r["pid"] for r in Registry().all()]
            doc = self.local.stop_all(grace)
            for pid in pids:
                reap(pid, REAP_TIMEOUT)
        log.info("stopped every worker (%d)", len(doc["stopped"]))
        return doc

    def download(self, ref: str, model_id: str | None, sha256: str | None,
                 retries: int | None, report: Reporter = null_reporter) -> Doc:
        try:
            doc = self.local.download(ref, model_id, sha256, retries, report)
        finally:
            self.on_change()
        log.info("model %s present (%s bytes transferred)", doc["id"],
                 doc.get("transferred_bytes"))
        return doc

    def import_model(self, path: Path, model_id: str | None, copy: bool,
                     report: Reporter = null_reporter) -> Doc:
        with self._changing():
            doc = self.local.import_model(path, model_id, copy, report)
        log.info("model %s imported from %s", doc["id"], path)
        return doc

    def remove(self, model_id: str, force: bool) -> Doc:
        with self._changing():
            doc = self.local.remove(model_id, force)
        log.info("model %s removed", model_id)
        return doc
