"""rbee: run LLMs across the GPU machines of a home lab, over plain SSH."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from rbee_common.clikit import FormatOpt, VersionOpt, parse_devices, reporting, root_app
from rbee_common.errors import UsageError
from rbee_common.names import BACKENDS
from rbee_common.output import Format, TokenSink, console, run_app, write_json
from rbee_keeper.cli_hosts import app as hosts_app
from rbee_keeper.cli_jobs import app as jobs_app
from rbee_keeper.cli_pool import pool
from rbee_keeper.cli_queen import app as queen_app
from rbee_keeper.cli_workers import app as workers_app

app = root_app("rbee", "Run local LLMs across the GPU machines of a home lab, over plain SSH.")
app.add_typer(hosts_app, name="hosts")
app.add_typer(workers_app, name="workers")
app.add_typer(queen_app, name="queen")
app.add_typer(jobs_app, name="jobs")
app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
            add_help_option=False)(pool)

AcceptNewOpt = Annotated[bool, typer.Option(
    "--accept-new-host-key",
    help="Trust and remember SSH host keys not yet in known_hosts (never a changed key).")]


@app.callback()
def _root(version: VersionOpt = None) -> None:
    """Run local LLMs across the GPU machines of a home lab, over plain SSH."""


@app.command()
def infer(
    model: Annotated[str, typer.Option("--model", "-m",
                                       help="Catalog id, hf:…, https://… or file:…")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt; - reads stdin.")],
    host: Annotated[list[str] | None, typer.Option("--host", help="Only these hosts.")] = None,
    backend: Annotated[str | None, typer.Option(help="cpu, cuda or metal.")] = None,
    device: Annotated[str | None, typer.Option(
        help="Device index, or several GPUs of one host to split across: 0,1.")] = None,
    ctx: Annotated[int | None, typer.Option(min=16, help="Context size of a new worker.")]
    = None,
    max_tokens: Annotated[int, typer.Option(min=1, max=1_000_000,
                                            help="Tokens to generate at most.")] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, max=5.0,
                                               help="Sampling temperature (0 = greedy).")]
    = 0.7,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling.")] = 0.95,
    top_k: Annotated[int, typer.Option(min=0, help="Top-k sampling (0 = off).")] = 40,
    seed: Annotated[int | None, typer.Option(min=0, max=2**32 - 1, help="Sampling seed.")]
    = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    split: Annotated[str | None, typer.Option(
        metavar="HOST,HOST", help="One model across these hosts (llama.cpp RPC over SSH); "
                                  "the first runs the worker.")] = None,
    insecure_rpc: Annotated[bool, typer.Option(
        "--insecure-rpc", help="A split's lenders listen on their hosts' addresses and the "
                               "worker reaches them directly: faster than SSH tunnels, but "
                               "unauthenticated and unencrypted (a trusted LAN only).")]
    = False,
    accept_new_host_key: AcceptNewOpt = False,
    fmt: FormatOpt = Format.text,
) -> None:
    """Run a prompt: place it, fetch the model and start a worker if needed, stream tokens.

    Examples:
      rbee infer -m qwen2.5-0.5b -p "Why is the sky blue?"
      echo "Summarise: …" | rbee infer -m tinyllama -p - --host mac --format json
      rbee infer -m llama-70b -p "Hi" --split workstation,gaming
    """
    from rbee_keeper import infer as infer_mod
    from rbee_keeper.split import split_hosts

    text = sys.stdin.read() if prompt == "-" else prompt
    if not text:
        raise UsageError("the prompt is empty")
    if backend is not None and backend not in BACKENDS:
        raise UsageError(f"--backend {backend!r}: choose cpu, cuda or metal")
    req = infer_mod.InferRequest(
        model=model, prompt=text, hosts=tuple(host or ()), backend=backend,
        device=parse_devices(device),
        ctx=ctx, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        seed=seed, stop=tuple(stop or ()), split=split_hosts(split, host, device),
        insecure_rpc=insecure_rpc)
    with TokenSink(fmt) as on_text, reporting(fmt) as report:
        if infer_mod.uses_queen():
            doc = infer_mod.run_via_queen(req, on_text, report)
        else:
            doc = infer_mod.run(req, on_text, report, accept_new_host_key)
    if fmt is Format.text:
        from rbee_keeper.render import infer_summary

        console(stderr=True).print(infer_summary(doc))
    elif fmt is Format.ndjson:
        write_json({"event": "result", "result": doc})
    else:
        write_json(doc)


def main() -> None:
    run_app(app, "rbee")
