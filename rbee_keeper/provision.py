"""Getting a worker ready on a host: the model there, a worker started with its own token,
and the worker remembered (with that token) so the next job finds it without SSH.

Every path that starts or adopts a worker — `rbee infer`, `rbee pool worker spawn`, and the
queen — goes through here, so a worker is always remembered the same way.
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from typing import Any

from rbee_common.errors import Interrupted
from rbee_common.fit import worker_devices
from rbee_common.progress import Reporter, null_reporter
from rbee_keeper import cache
from rbee_keeper.hive import HiveClient, SpawnRequest
from rbee_keeper.hosts import HostConfig

TOKEN_BYTES = 32


def new_token() -> str:
    """A worker's bearer token: made here, sent over stdin, never on a command line."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def known_worker(host: HostConfig, record: dict[str, Any], token: str,
                 ref: str = "") -> cache.KnownWorker:
    """What the controller keeps about a worker: where it is, its token, what it serves."""
    return cache.KnownWorker(host=host.name, id=record["id"], url=host.worker_url(record["port"]),
                             token=token, model=record["model"], backend=record["backend"],
                             device=record["device"], ctx=record["ctx"], ref=ref,
                             devices=tuple(worker_devices(record)))


def remember(host: HostConfig, record: dict[str, Any], token: str,
             ref: str = "") -> cache.KnownWorker:
    known = known_worker(host, record, token, ref)
    cache.remember(known)
    return known


def ensure_model(hive: HiveClient, ref: str, model_id: str, sha256: str | None,
                 report: Reporter = null_reporter) -> dict[str, Any]:
    """Download the model to the host unless it is there (the hive checks); its document."""
    try:
        return hive.download(ref, model_id=model_id, sha256=sha256, on_event=report)
    except KeyboardInterrupt:  # Ctrl+C: the host keeps what arrived, so say how to go on
        raise Interrupted(f"download of {model_id} to {hive.host.name} interrupted",
                          hint="Run the same command again: the download resumes from the "
                               "bytes the host kept.", model=model_id,
                          host=hive.host.name) from None


def spawn_worker(hive: HiveClient, req: SpawnRequest,
                 report: Reporter = null_reporter) -> tuple[dict[str, Any], str]:
    """Spawn a worker with a fresh token, bound where the controller can reach it."""
    if req.bind is None:
        req = replace(req, bind=hive.host.worker_bind())
    token = new_token()
    return hive.spawn(req, token, on_event=report), token


def start_worker(hive: HiveClient, req: SpawnRequest, ref: str = "",
                 report: Reporter = null_reporter) -> cache.KnownWorker:
    """Spawn a worker (`spawn_worker`) and remember it for the next `rbee infer`."""
    record, token = spawn_worker(hive, req, report)
    return remember(hive.host, record, token, ref)


def adopt_worker(hive: HiveClient, record: dict[str, Any], ref: str = "") -> cache.KnownWorker:
    """Use a worker the host already runs (an idle one placement chose): fetch its token."""
    return remember(hive.host, record, hive.token(record["id"]), ref)


class SplitRun:
    """A worker that borrows other hosts' devices, its lenders and their tunnels: what one
    split job holds, given back together (the tunnels live in this controller, so the worker
    cannot outlive them)."""

    def __init__(self, primary: HiveClient) -> None:
        from rbee_keeper.tunnel import Tunnels

        self.primary = primary
        self.worker: cache.KnownWorker | None = None
        self.lenders: list[tuple[HiveClient, dict[str, Any]]] = []  # (its host, its record)
        self.endpoints: dict[str, tuple[str, dict[str, Any]]] = {}  # tunnel end → lender
        self.tunnels = Tunnels()

    def start(self, split: Any, hives: dict[str, HiveClient], req: SpawnRequest,
              ref: str = "", report: Reporter = null_reporter,
              cache_dir: str | None = None, direct: bool = False) -> cache.KnownWorker:
        """Start a lender per borrowed device, tunnel each to the primary host, then the
        worker there with the tunnels as its RPC endpoints. `direct`: the lenders listen on
        their hosts' addresses and the worker connects to them there, without a tunnel
        (faster; llama.cpp's RPC has no authentication: for a network the user trusts).
        On failure, undo what started."""
        from rbee_keeper.tunnel import side_of

        try:
            near = side_of(self.primary)
            ends = []
            for share in split.lenders:
                hive = hives[share.host]
                report({"event": "log", "message": f"rbee: lending {share.label} "
                        f"({share.fraction:.0%} of the model) to {self.primary.host.name}"})
                device = f"{share.backend}:{share.index}"
                if direct:
                    record = hive.lend(device, cache_dir=cache_dir, bind=hive.host.worker_bind())
                    self.lenders.append((hive, record))
                    end = f"{hive.host.worker_address()}:{record['port']}"
                else:
                    record = hive.lend(device, cache_dir=cache_dir)
                    self.lenders.append((hive, record))
                    port = self.tunnels.forward(near, side_of(hive), int(record["port"]))
                    end = f"127.0.0.1:{port}"
                self.endpoints[end] = (share.host, record)
                ends.append(end)
            record, token = spawn_worker(self.primary, replace(req, rpc=tuple(ends)), report)
            self.worker = known_worker(self.primary.host, record, token, ref)
            return self.worker
        except BaseException:
            self.close()
            raise

    def lost_lenders(self) -> list[str]:
        """The lenders that are no longer serving, as `HOST LENDER-ID (DEVICE)`."""
        gone = []
        for hive, record in self.lenders:
            try:
                states = {lender["id"]: lender.get("state") for lender in hive.lenders()}
            except Exception:  # its host cannot be asked: count it as lost
                states = {}
            if states.get(record["id"]) not in ("ready", "busy"):  # busy: serving the worker
                gone.append(f"{hive.host.name} {record['id']} ({record.get('device')})")
        return gone

    def close(self) -> None:
        """Stop the worker first (it aborts when a lender goes), then the lenders, then the
        tunnels; a step that fails does not stop the others."""
        import contextlib

        if self.worker is not None:
            with contextlib.suppress(Exception):
                self.primary.stop(self.worker.id, timeout=30)
        for hive, record in self.lenders:
            with contextlib.suppress(Exception):
                hive.stop_lender(record["id"])
        self.lenders = []
        self.tunnels.close()
