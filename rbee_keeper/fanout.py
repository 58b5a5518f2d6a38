"""Run one function per host in parallel; every host gets a result or its own error.

A host that is down or slow costs its own timeout and nothing else (fabric's GroupResult).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from rbee_common.errors import RbeeError
from rbee_common.output import EXIT_FAILURE, EXIT_OK, EXIT_PARTIAL
from rbee_keeper.errors import HostUnreachable

T = TypeVar("T")


@dataclass
class HostOutcome(Generic[T]):
    name: str
    value: T | None = None
    error: RbeeError | None = None
    elapsed_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and self.value is not None

    def to_dict(self, key: str) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "ok": self.ok,
                               "elapsed_ms": round(self.elapsed_ms, 1)}
        if self.ok:
            doc[key] = self.value
        else:
            assert self.error is not None
            doc["error"] = self.error.to_dict()
        return doc


def fan_out(names: Iterable[str], fn: Callable[[str], T], timeout: float) -> list[HostOutcome[T]]:
    """Call fn(name) for every host at once; give up on a host after `timeout` seconds."""
    outcomes = {name: HostOutcome[T](name) for name in names}
    started = time.monotonic()

    def one(o: HostOutcome[T]) -> None:
        t0 = time.monotonic()
        try:
            o.value = fn(o.name)
        except RbeeError as e:
            o.error = e
        except Exception as e:  # one host's surprise must not sink the others
            o.error = RbeeError(f"{o.name}: {type(e).__name__}: {e}")
        o.elapsed_ms = (time.monotonic() - t0) * 1000

    threads = [threading.Thread(target=one, args=(o,), daemon=True, name=f"host-{o.name}")
               for o in outcomes.values()]
    for t in threads:
        t.start()
    for t, o in zip(threads, outcomes.values(), strict=True):
        t.join(max(0.0, started + timeout - time.monotonic()))
        if t.is_alive():
            o.error = HostUnreachable(f"{o.name}: no answer within {timeout:g}s")
            o.elapsed_ms = timeout * 1000
    return list(outcomes.values())


EXIT_FOR = {"ok": EXIT_OK, "partial": EXIT_PARTIAL, "error": EXIT_FAILURE}


def exit_code(status: str) -> int:
    """The exit code of a many-hosts document's status: ok 0, partial 3, error 1."""
    return EXIT_FOR[status]


def overall(outcomes: list[HostOutcome[Any]]) -> tuple[str, int]:
    """("ok" | "partial" | "error", exit code 0 | 3 | 1)."""
    failed = sum(not o.ok for o in outcomes)
    if not failed:
        return "ok", EXIT_OK
    if failed == len(outcomes):
        return "error", EXIT_FAILURE
    return "partial", EXIT_PARTIAL
