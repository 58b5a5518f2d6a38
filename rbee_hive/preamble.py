"""Settings a controller sends on stdin instead of the command line (where `ps` shows them).

`rbee-hive --stdin-json …` reads one JSON line first: {"env": {...}, "token": "..."}. The
env is applied to this process; the token is kept for `worker spawn --token-stdin`.
`rbee-hive --stdin-json` alone (how `rbee` runs every command over SSH) takes the command
itself from that line too, as "argv": then the host's login shell sees no word of it.

With "watch_stdin", stdin stays open while the controller waits, and its closing ends the
command as a Ctrl+C would. With "acks" too, the controller writes "ack" once it has read the
command's answer: what the command made (a worker) is undone if stdin closes before that,
since the answer, and so the thing, would reach no one (see unless_acknowledged).
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from collections.abc import Callable
from typing import Any

from rbee_common.errors import UsageError

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_preamble: dict[str, Any] = {}
STDIN_CLOSED_GRACE = 30.0  # seconds a command has to end after its controller went away
ACK_WAIT = 10.0  # seconds an answered command waits for the controller's acknowledgement
_acked = threading.Event()  # the controller said it read the answer
_closed = threading.Event()  # the controller's end of stdin closed


def read_preamble() -> None:
    if _preamble:
        return  # read once: a second read would wait on the controller's open stdin
    line = sys.stdin.readline()
    try:
        doc = json.loads(line)
    except ValueError as e:
        raise UsageError("--stdin-json expects one JSON object on stdin's first line") from e
    env = doc.get("env") or {}
    if not isinstance(env, dict) or not all(
            isinstance(k, str) and _ENV_NAME.match(k) and isinstance(v, str)
            for k, v in env.items()):
        raise UsageError("--stdin-json: env must map variable names to strings")
    os.environ.update(env)
    _preamble.update(doc)
    _preamble["_read"] = True
    if doc.get("watch_stdin"):
        _exit_when_stdin_closes()


def command_line(argv: list[str]) -> list[str]:
    """The command to run: argv itself, or, for `--stdin-json` alone, the preamble's "argv"
    (read now, so the root callback does not read it again)."""
    if argv != ["--stdin-json"]:
        return argv
    read_preamble()
    words = _preamble.get("argv")
    if not isinstance(words, list) or not words or not all(isinstance(w, str) for w in words):
        raise UsageError("`rbee-hive --stdin-json` alone expects the command on stdin: "
                         '"argv", a list of strings, in its first JSON line')
    return words


def _exit_when_stdin_closes() -> None:
    """The controller keeps our stdin open while it waits for us; when it goes away (its
    timeout, Ctrl+C, a dropped SSH connection) stdin closes and this command ends too,
    instead of running on unseen on the host."""
    import signal
    import time

    def watch() -> None:
        # the raw descriptor, not sys.stdin: a thread blocked inside a buffered reader holds
        # its lock, and the interpreter aborts when it cannot take that lock at exit
        seen = b""
        try:
            while chunk := os.read(0, 4096):
                seen = (seen + chunk)[-8:]
                if b"ack" in seen:
                    _acked.set()
        except OSError:
            pass
        _closed.set()
        # end as a Ctrl+C here would (a download keeps its bytes, a loading worker is
        # stopped); a command that cannot, within the grace, is terminated
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(STDIN_CLOSED_GRACE)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="stdin-watch", daemon=True).start()


def unless_acknowledged(undo: Callable[[], None]) -> None:
    """Run `undo` as this command exits if its controller goes away without acknowledging the
    answer (a Ctrl+C that came just after a worker got ready: the controller never learns of
    it). Only for a controller that asked for acknowledgements; it waits at most ACK_WAIT."""
    if not (_preamble.get("acks") and _preamble.get("watch_stdin")):
        return
    import atexit
    import time

    def settle() -> None:
        sys.stdout.flush()
        # the answer is complete: its end tells the controller so (it acks when it reads it)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        deadline = time.monotonic() + ACK_WAIT
        while not (_acked.is_set() or _closed.is_set()) and time.monotonic() < deadline:
            _closed.wait(0.02)
        if _closed.is_set() and not _acked.is_set():
            undo()

    atexit.register(settle)


def stdin_token() -> str:
    """The worker token: from the preamble when one was read, else stdin's next line."""
    token = _preamble.get("token")
    return str(token) if token else sys.stdin.readline().strip()
