"""rbee-hive models …: the catalog, and the GGUF files on this host."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rbee_common.clikit import FormatOpt, reporting
from rbee_common.output import Format, emit

app = typer.Typer(help="The model catalog and the models on this host.", no_args_is_help=True)

IdOpt = Annotated[str | None, typer.Option("--id", help="Register under this id.")]


@app.command()
def catalog(fmt: FormatOpt = Format.text) -> None:
    """Models known by a short name (shipped catalog + ~/.config/rbee/catalog.toml).

    Example: rbee-hive models catalog
    """
    from rbee_hive.ops import hive
    from rbee_hive.render import render_catalog

    emit(hive().catalog(), fmt, render_catalog)


@app.command("list")
def list_(fmt: FormatOpt = Format.text) -> None:
    """Models on this host.

    Example: rbee-hive models list --format json
    """
    from rbee_hive.ops import hive
    from rbee_hive.render import render_models

    emit(hive().models(), fmt, render_models)


@app.command()
def info(ref: Annotated[str, typer.Argument(help="Catalog id, hf:…, https://… or file:…")],
         ctx: Annotated[int | None, typer.Option(help="Context size for the estimate.")] = None,
         fmt: FormatOpt = Format.text) -> None:
    """GGUF metadata and the memory estimate placement uses (weights + KV cache + overhead).

    Example: rbee-hive models info tinyllama --ctx 8192
    """
    from rbee_hive.ops import hive
    from rbee_hive.render import render_model

    emit(hive().model_info(ref, ctx), fmt, render_model)


@app.command()
def download(ref: Annotated[str, typer.Argument(help="Catalog id, hf:…, https://… or file:…")],
             model_id: IdOpt = None,
             retries: Annotated[int | None, typer.Option(
                 help="Retries of a dropped connection (default 3).")] = None,
             sha256: Annotated[str | None, typer.Option(
                 help="Expected sha256 (overrides the catalog's).")] = None,
             fmt: FormatOpt = Format.text) -> None:
    """Download a model (resumable), verify it, and register it.

    Examples:
      rbee-hive models download tinyllama
      rbee-hive models download hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf
    """
    from rbee_hive.ops import hive
    from rbee_hive.render import render_model

    with reporting(fmt) as report:
        doc = hive().download(ref, model_id, sha256, retries, report)
    emit(doc, fmt, render_model)


@app.command("import")
def import_(path: Annotated[Path, typer.Argument(help="A GGUF file already on this host.")],
            model_id: IdOpt = None,
            copy: Annotated[bool, typer.Option(
                "--copy", help="Copy instead of hard-linking.")] = False,
            fmt: FormatOpt = Format.text) -> None:
    """Register a GGUF file you already have (verified, then hard-linked or copied).

    Example: rbee-hive models import ~/Downloads/gemma-3-270m-q4_k_m.gguf --id gemma3-270m
    """
    from rbee_hive.ops import hive
    from rbee_hive.render import render_model

    with reporting(fmt) as report:
        doc = hive().import_model(path, model_id, copy, report)
    emit(doc, fmt, render_model)


@app.command()
def verify(model_id: Annotated[str, typer.Argument(metavar="ID")],
           fmt: FormatOpt = Format.text) -> None:
    """Re-check a model's GGUF header and sha256 against its registration.

    Example: rbee-hive models verify tinyllama
    """
    from rbee_hive.ops import hive
    from rbee_hive.render import render_verify

    with reporting(fmt) as report:
        doc = hive().verify(model_id, report)
    emit(doc, fmt, render_verify)


@app.command()
def rm(model_id: Annotated[str, typer.Argument(metavar="ID")],
       force: Annotated[bool, typer.Option(help="Remove even if a worker serves it.")] = False,
       fmt: FormatOpt = Format.text) -> None:
    """Unregister a model and delete its file.

    Example: rbee-hive models rm tinyllama
    """
    from rbee_hive.ops import hive
    from rbee_hive.render import render_removed

    emit(hive().remove(model_id, force), fmt, render_removed)
