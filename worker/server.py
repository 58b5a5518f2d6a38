"""How the worker starts and serves: the model loads while the HTTP stack imports, and
uvicorn serves with every accepted connection tuned for latency (rbee_common.tcpserve says
why and how)."""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rbee_common.errors import RbeeError
from rbee_common.names import HealthStatus
from rbee_common.tcpserve import http_protocol
from worker.errors import ModelLoadFailed

if TYPE_CHECKING:  # asyncio costs 50 ms to import, before the model load could start

    from worker.engine import Engine

log = logging.getLogger("rbee.worker")


class Loading:
    """The model's load, started in a thread as soon as the worker knows what to load.

    Loading needs only llama_cpp, and llama.cpp releases the GIL while it reads weights (and,
    checking the backend, while CUDA starts), so the HTTP stack (pydantic, starlette,
    uvicorn) imports meanwhile: with a core free, start-up costs about max(load, imports)
    rather than their sum. (llama.cpp's log lines still need the GIL, one callback each.)
    """

    def __init__(self, engine: Engine) -> None:
        # llama_cpp is imported before the thread starts, not in it: two threads importing
        # at once only take turns holding the GIL (and may see each other's modules half
        # initialised), and the load cannot begin until llama_cpp is in anyway
        import llama_cpp  # noqa: F401

        self.engine = engine
        self.error: RbeeError | None = None
        self._lock = threading.Lock()
        self._ended = False
        self._then: Callable[[RbeeError | None], None] | None = None
        self.took_s = 0.0
        s = engine.settings
        log.info("loading %s (%s, ctx %d)", s.model_path, s.backend, s.ctx)
        self.thread = threading.Thread(target=self._run, name="load", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        try:
            self.engine.check_backend()
            self.engine.load()
        except RbeeError as e:
            self.error = e
        except Exception as e:  # anything else must still end the load, not leave it "loading"
            log.exception("model load failed")
            self.error = ModelLoadFailed(f"loading {self.engine.settings.model_path} failed: {e}")
        self.took_s = time.monotonic() - started
        with self._lock:
            self._ended = True
            then = self._then
        if then is not None:
            then(self.error)

    def then(self, fn: Callable[[RbeeError | None], None]) -> None:
        """Call fn(the load's error, or None) when the load ends: at once if it has ended."""
        with self._lock:
            if not self._ended:
                self._then = fn
                return
        fn(self.error)


def run(app: Any, sock: socket.socket, loading: Loading, where: str,
        fail: Callable[[RbeeError], None]) -> int:
    """Serve `app` on the bound socket until shutdown; ready once the load has ended well."""
    import uvicorn

    state = app.state.worker
    engine = loading.engine
    exit_code = 0

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            state.cancel_current()  # a running job ends within one token
            super().handle_exit(sig, frame)

    # log_config=None: uvicorn's loggers use the root handler main() set up. Its own config
    # would bind sys.stderr now, and llama-cpp-python swaps sys.stderr for /dev/null while a
    # model loads, which may be right now: uvicorn's errors would then go nowhere for good.
    server = Server(uvicorn.Config(app, http=http_protocol(), ws="none", log_config=None,
                                   log_level="warning", access_log=False, lifespan="off",
                                   timeout_graceful_shutdown=5))
    state.request_exit = lambda: setattr(server, "should_exit", True)

    def loaded(err: RbeeError | None) -> None:
        nonlocal exit_code
        if err is None:
            state.status = HealthStatus.ready
            log.info("ready on %s (the model took %.2f s to load)", where, loading.took_s)
            return
        state.error, state.status, exit_code = err, HealthStatus.error, 1
        for line in engine.logs.lines:
            sys.stderr.write(f"llama.cpp: {line}\n")
        fail(err)
        server.should_exit = True

    loading.then(loaded)
    server.run(sockets=[sock])
    job = state.job
    if job is not None and job.thread is not None:
        job.thread.join(timeout=5)
    return exit_code
