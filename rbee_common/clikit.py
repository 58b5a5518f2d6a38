"""Pieces every rbee CLI shares: the --format option and progress reporting around a call."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated

import typer

from rbee_common.output import Format
from rbee_common.progress import Reporter, close_reporter, reporter_for

FormatOpt = Annotated[
    Format,
    typer.Option("--format", help="Output: text for people, json for scripts, ndjson to stream "
                                  "progress events then the result.", case_sensitive=False),
]


@contextlib.contextmanager
def reporting(fmt: Format) -> Iterator[Reporter]:
    """A progress reporter for `fmt`, closed (bars finished) however the block ends."""
    report = reporter_for(fmt)
    try:
        yield report
    finally:
        close_reporter(report)


def parse_devices(value: str | None) -> tuple[int, ...] | None:
    """`--device 1` or `--device 0,1` (several GPUs of one host) → indices; USAGE if not."""
    if value is None:
        return None
    from rbee_common.errors import UsageError

    parts = [p.strip() for p in value.split(",")]
    if not all(p.isdigit() for p in parts) or len(set(parts)) != len(parts):
        raise UsageError(f"--device {value!r}: give a device index, or several as 0,1")
    return tuple(int(p) for p in parts)


def parse_split(value: str | None) -> list[float] | None:
    """`--tensor-split 0.6,0.4` → shares; USAGE if not positive numbers."""
    if value is None:
        return None
    from rbee_common.errors import UsageError

    try:
        shares = [float(p) for p in value.split(",")]
    except ValueError:
        shares = []
    if not shares or any(not s > 0 for s in shares):
        raise UsageError(f"--tensor-split {value!r}: give positive shares, e.g. 0.6,0.4")
    return shares


def root_app(name: str, help: str) -> typer.Typer:
    """The top-level app of an rbee CLI: errors and exit codes are run_app's job, not typer's."""
    return typer.Typer(name=name, help=help, no_args_is_help=True, add_completion=False,
                       pretty_exceptions_enable=False, rich_markup_mode=None)


def version_callback(value: bool) -> None:
    if value:
        from rbee_common import __version__

        typer.echo(f"rbee {__version__}")
        raise typer.Exit()


VersionOpt = Annotated[
    bool | None,
    typer.Option("--version", callback=version_callback, is_eager=True,
                 help="Print the version and exit."),
]
