"""stdout is data, stderr is narration: formats, JSON documents, errors and exit codes."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from rbee_common.errors import Interrupted, RbeeError, UsageError

if TYPE_CHECKING:
    import rich.console

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_INTERRUPTED = 130


class Format(StrEnum):
    text = "text"
    json = "json"
    ndjson = "ndjson"


def write_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, ensure_ascii=False) + "\n")
    sys.stdout.flush()


_consoles: dict[bool, rich.console.Console] = {}


def console(stderr: bool = False) -> rich.console.Console:
    """The rich console for stdout (data in text mode) or stderr (narration)."""
    if stderr not in _consoles:
        from rich.console import Console

        _consoles[stderr] = Console(stderr=stderr, highlight=False, soft_wrap=True)
    return _consoles[stderr]


def emit(doc: dict[str, Any], fmt: Format, render: Callable[[dict[str, Any]], None]) -> None:
    """Print a result document: rendered for people in text mode, as JSON otherwise."""
    if fmt is Format.text:
        render(doc)
    elif fmt is Format.ndjson:
        write_json({"event": "result", "result": doc})
    else:
        write_json(doc)


def emit_error(err: RbeeError, fmt: Format) -> None:
    if fmt is Format.json:
        write_json(err.envelope())
    elif fmt is Format.ndjson:
        write_json({"event": "error", **err.envelope(), "exit_code": err.exit_code})
    else:
        from rbee_common.textsafe import safe

        con = console(stderr=True)
        con.print(f"[bold red]Error:[/] {safe(err.message)} [dim]({safe(err.code)})[/]")
        if err.hint:
            con.print(f"[dim]Hint:[/] {safe(err.hint)}")


def sniff_format(argv: Sequence[str]) -> Format:
    """The --format a command line asks for, read before parsing so usage errors honour it."""
    for i, arg in enumerate(argv):
        value = None
        if arg == "--format" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--format="):
            value = arg.split("=", 1)[1]
        if value in Format.__members__:
            return Format(value)
    if list(argv) == ["--stdin-json"]:  # rbee-hive run by rbee, its command on stdin
        return Format.ndjson
    return Format.text


def run_app(app: Any, prog: str, argv: Sequence[str] | None = None,
            prepare: Callable[[list[str]], list[str]] | None = None) -> None:
    """Run a typer app: map rbee errors, usage errors and Ctrl+C to output and exit codes.
    `prepare` may replace the arguments first (its errors are reported like the command's)."""
    import typer
    import typer.main

    args = list(sys.argv[1:] if argv is None else argv)
    fmt = sniff_format(args)
    command = typer.main.get_command(app)
    try:
        if prepare is not None:
            args = prepare(args)
            fmt = sniff_format(args)
        # not command.main(): typer's main turns Ctrl+C into a bare exit status 130, which
        # would leave the user (and `--format json | jq`) without the CANCELLED error below
        with command.make_context(prog, args) as ctx:
            rv = command.invoke(ctx)
        code = rv if isinstance(rv, int) else EXIT_OK
    except RbeeError as e:
        _ignore_interrupts()
        _debug_traceback()
        if isinstance(e, UsageError) and not e.hint:  # every error says what to do next
            e.hint = f"Run `{command_path(command, prog, args)} --help`."
        emit_error(e, fmt)
        code = e.exit_code
    except typer.Exit as e:
        code = e.exit_code
    except typer.TyperException as e:  # click's usage errors, as typer vendors them
        if type(e).__name__ == "NoArgsIsHelpError":  # a bare `rbee`: its help, not an error
            sys.stdout.write(e.format_message().rstrip("\n") + "\n")
            sys.stdout.flush()
            sys.exit(EXIT_USAGE)
        ctx = getattr(e, "ctx", None)
        ctx_path = ctx.command_path if ctx is not None else prog
        emit_error(UsageError(e.format_message(), hint=f"Run `{ctx_path} --help`."), fmt)
        code = EXIT_USAGE if e.exit_code == EXIT_USAGE else EXIT_FAILURE
    except (KeyboardInterrupt, typer.Abort):
        _ignore_interrupts()
        emit_error(Interrupted("interrupted", hint=""), fmt)
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        # `rbee … | head` closed our stdout: not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_FAILURE
    except Exception as e:  # the last resort: one line, the traceback only on request
        if os.environ.get("RBEE_DEBUG") == "1":
            raise
        err = RbeeError(f"internal error: {type(e).__name__}: {e}",
                        hint="Run again with RBEE_DEBUG=1 for the traceback and report it.")
        emit_error(err, fmt)
        code = EXIT_FAILURE
    _ignore_interrupts()
    sys.stdout.flush()
    sys.exit(code)


def _ignore_interrupts() -> None:
    """The command is over: a second Ctrl+C must not cut its report short with a traceback
    (or end the process by the signal, with another status than the one reported)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def command_path(command: Any, prog: str, args: Sequence[str]) -> str:
    """The (sub)command a command line names, e.g. `rbee pool status`: whose --help to read."""
    words = [prog]
    for arg in args:
        sub = getattr(command, "commands", {}).get(arg)
        if sub is None:
            if arg.startswith("-"):
                continue  # an option of a group, e.g. --stdin-json: look further
            break
        words.append(arg)
        command = sub
    return " ".join(words)


def _debug_traceback() -> None:
    if os.environ.get("RBEE_DEBUG") == "1":
        import traceback

        traceback.print_exc(file=sys.stderr)


class TokenSink:
    """Generated text as it arrives: raw on stdout in text mode (neutralised on a terminal),
    `{"event": "token"}` lines in ndjson, held back in json (the document comes at the end).
    Used as a context manager, it leaves partial text on a line of its own however the
    stream ends."""

    def __init__(self, fmt: Format) -> None:
        self.fmt = fmt
        self.last = ""

    def __call__(self, t: str) -> None:
        if t:
            self.last = t
        if self.fmt is Format.text:
            from rbee_common.textsafe import for_terminal

            sys.stdout.write(for_terminal(t, sys.stdout))
            sys.stdout.flush()
        elif self.fmt is Format.ndjson:
            write_json({"event": "token", "t": t})

    def __enter__(self) -> TokenSink:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fmt is Format.text and self.last and not self.last.endswith("\n"):
            sys.stdout.write("\n")  # the partial text stays, on its own line
            sys.stdout.flush()
