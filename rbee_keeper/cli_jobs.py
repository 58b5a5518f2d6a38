"""rbee jobs …: jobs on the queen (submit, list, status, cancel, follow)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from rbee_common.clikit import FormatOpt
from rbee_common.output import Format, TokenSink, emit, write_json

if TYPE_CHECKING:
    from rbee_keeper.queen_client import QueenClient

app = typer.Typer(help="Jobs on the queen: submit, list, status, cancel, follow.",
                  no_args_is_help=True)

IdArg = Annotated[str, typer.Argument(metavar="ID", help="Job id (see `rbee jobs list`).")]
QueenOpt = Annotated[str | None, typer.Option("--queen", help="The queen's URL.")]


def _client(url: str | None) -> QueenClient:
    from rbee_keeper.queen_client import QueenClient, target

    return QueenClient(target(url))


def _stream(client: QueenClient, job_id: str, fmt: Format) -> int:
    from rbee_keeper.queen_client import follow

    with TokenSink(fmt) as on_text:
        end = follow(client, job_id, on_text)
    doc = client.task(job_id)
    if fmt is Format.text:
        from rbee_common.output import console
        from rbee_common.textsafe import safe

        console(stderr=True).print(f"[dim]{safe(end.get('tokens_out', 0))} tokens · "
                                   f"{safe(end.get('stop_reason'))} · {safe(job_id)}[/]")
    elif fmt is Format.ndjson:
        write_json({"event": "result", "result": doc})
    else:
        write_json(doc)
    return 0


@app.command()
def submit(model: Annotated[str, typer.Option("--model", "-m", help="Catalog id or ref.")],
           prompt: Annotated[str, typer.Option("--prompt", "-p", help="- reads stdin.")],
           max_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 128,
           temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.7,
           seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
           stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")]
           = None,
           follow_: Annotated[bool, typer.Option("--follow", "-f",
                                                 help="Stream its tokens.")] = False,
           queen: QueenOpt = None, fmt: FormatOpt = Format.text) -> int:
    """Queue a job on the queen; print its id (or, with --follow, its answer).

    Examples:
      rbee jobs submit -m tinyllama -p "Why is the sky blue?"
      rbee jobs submit -m tinyllama -p - --follow < prompt.txt
    """
    from rbee_common.errors import UsageError
    from rbee_keeper.render import render_submitted

    text = sys.stdin.read() if prompt == "-" else prompt
    if not text:
        raise UsageError("the prompt is empty")
    client = _client(queen)
    doc = client.submit({"model": model, "prompt": text, "max_tokens": max_tokens,
                         "temperature": temperature, "seed": seed, "stop": stop or []})
    if follow_:
        return _stream(client, doc["id"], fmt)
    emit(doc, fmt, render_submitted)
    return 0


@app.command("list")
def list_(state: Annotated[str | None, typer.Option(
              help="Only these states: queued,placed,running,done,failed,cancelled.")] = None,
          model: Annotated[str | None, typer.Option(help="Only this model.")] = None,
          limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
          queen: QueenOpt = None, fmt: FormatOpt = Format.text) -> None:
    """Jobs on the queen, newest first.

    Example: rbee jobs list --state running,queued --format json
    """
    from rbee_keeper.render import render_jobs

    emit(_client(queen).tasks(state=state, model=model, limit=limit), fmt, render_jobs)


@app.command()
def status(job_id: IdArg, queen: QueenOpt = None, fmt: FormatOpt = Format.text) -> None:
    """One job: state, placement, timings and text.

    Example: rbee jobs status job-3f2a1c0d9e8b
    """
    from rbee_keeper.render import render_job

    emit(_client(queen).task(job_id), fmt, render_job)


@app.command()
def cancel(job_id: IdArg, queen: QueenOpt = None, fmt: FormatOpt = Format.text) -> None:
    """Cancel a queued or running job.

    Example: rbee jobs cancel job-3f2a1c0d9e8b
    """
    from rbee_keeper.render import render_job

    client = _client(queen)
    said = client.cancel(job_id)
    if not said.get("cancelling") and fmt is Format.text:
        from rbee_common.output import console
        from rbee_common.textsafe import safe

        console(stderr=True).print(f"[dim]{safe(job_id)} had already ended "
                                   f"({safe(said.get('state'))}): nothing to cancel[/]")
    emit(client.task(job_id), fmt, render_job)


@app.command()
def follow(job_id: IdArg, queen: QueenOpt = None, fmt: FormatOpt = Format.text) -> int:
    """Stream a job's tokens as they are generated (Ctrl+C cancels it).

    Example: rbee jobs follow job-3f2a1c0d9e8b
    """
    return _stream(_client(queen), job_id, fmt)
