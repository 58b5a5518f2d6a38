"""What to start on a host, in one typed form for every face: the keeper asks for it (over
the command transport or the pool daemon's HTTP API), the hive CLI forwards it to a running
daemon, and the daemon receives it (POST /v2/workers/start).

The worker's token is no field: it travels beside the request, so a request can be logged
or shown (its repr) without the secret.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SpawnRequest:
    """`rbee-hive worker spawn` in typed form."""

    backend: str
    model: str
    device: int | Sequence[int] = 0
    ctx: int | None = None
    port: int | None = None
    bind: str | None = None
    threads: int | None = None
    tensor_split: Sequence[float] | None = None
    wait: bool = True
    timeout: float | None = None
    rpc: Sequence[str] = ()  # lenders' RPC endpoints as this host reaches them (HOST:PORT)

    def devices(self) -> list[int]:
        return [self.device] if isinstance(self.device, int) else list(self.device)

    def body(self, token: str | None) -> dict[str, Any]:
        """The JSON of POST /v2/workers/start (the pool daemon's API, DESIGN §7)."""
        body: dict[str, Any] = {
            "backend": self.backend, "model": self.model,
            "device": self.device if isinstance(self.device, int) else list(self.device),
            "ctx": self.ctx, "port": self.port, "bind": self.bind, "threads": self.threads,
            "tensor_split": list(self.tensor_split) if self.tensor_split else None,
            "wait": self.wait, "timeout": self.timeout, "token": token}
        if self.rpc:  # only when asked: a daemon from before RPC lenders refuses the field
            body["rpc"] = list(self.rpc)
        return body
