"""rbee-hive models …: the catalog, and the GGUF files on this host."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Annotated

import typer

from rbee_common.clikit import FormatOpt, reporting
from rbee_common.errors import UsageError
from rbee_common.output import Format, emit
from rbee_hive import schemas

app = typer.Typer(help="The model catalog and the models on this host.", no_args_is_help=True)

IdOpt = Annotated[str | None, typer.Option("--id", help="Register under this id.")]


@app.command()
def catalog(fmt: FormatOpt = Format.text) -> None:
    """Models known by a short name (shipped catalog + ~/.config/rbee/catalog.toml).

    Example: rbee-hive models catalog
    """
    from rbee_common.catalog import load_catalog
    from rbee_hive.render import render_catalog
    from rbee_hive.store import ModelStore

    store = ModelStore()
    models = []
    for entry in load_catalog().values():
        record = store.get(entry.id)
        models.append({**entry.model_dump(), "downloaded": bool(
            record and record["source"] == entry.source and Path(record["path"]).is_file())})
    emit({"schema": schemas.CATALOG, "models": models}, fmt, render_catalog)


@app.command("list")
def list_(fmt: FormatOpt = Format.text) -> None:
    """Models on this host.

    Example: rbee-hive models list --format json
    """
    from rbee_hive.render import render_models
    from rbee_hive.store import ModelStore

    emit({"schema": schemas.MODELS, "models": ModelStore().list()}, fmt, render_models)


@app.command()
def info(ref: Annotated[str, typer.Argument(help="Catalog id, hf:…, https://… or file:…")],
         ctx: Annotated[int | None, typer.Option(help="Context size for the estimate.")] = None,
         fmt: FormatOpt = Format.text) -> None:
    """GGUF metadata and the memory estimate placement uses (weights + KV cache + overhead).

    Example: rbee-hive models info tinyllama --ctx 8192
    """
    from rbee_common.fit import default_ctx
    from rbee_common.ggufmeta import read_gguf_file
    from rbee_hive.render import render_model
    from rbee_hive.spawn import model_estimate
    from rbee_hive.store import ModelStore

    spec, record = ModelStore().resolve(ref)
    doc: dict = {"schema": schemas.MODEL, "id": spec.id, "name": spec.name,
                 "source": str(spec.source), "downloaded": record is not None,
                 "size": spec.size, "sha256": spec.sha256}
    if record is None and spec.source.kind == "file" and Path(spec.source.path).is_file():
        from rbee_hive.store import model_record

        path = Path(spec.source.path)
        record = model_record(spec.id, spec.name, str(spec.source), path, "", read_gguf_file(path))
        record.pop("sha256")
    if record is not None:
        doc.update({k: v for k, v in record.items() if k != "added_at"})
        ctx = ctx or default_ctx(record["gguf"].get("context_length"))
        doc["estimate"] = model_estimate(record, ctx).to_dict()
    emit(doc, fmt, render_model)


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
    from rbee_hive.download import fetch, with_id
    from rbee_hive.render import render_model
    from rbee_hive.store import ModelStore

    store = ModelStore()
    spec, _ = store.resolve(ref)
    if sha256 is not None:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise UsageError("--sha256 takes 64 lower-case hex digits")
        spec = dataclasses.replace(spec, sha256=sha256)
    with reporting(fmt) as report:
        record = fetch(with_id(spec, model_id), store, report, retries)
    emit({"schema": schemas.MODEL, **record}, fmt, render_model)


@app.command("import")
def import_(path: Annotated[Path, typer.Argument(help="A GGUF file already on this host.")],
            model_id: IdOpt = None,
            copy: Annotated[bool, typer.Option(
                "--copy", help="Copy instead of hard-linking.")] = False,
            fmt: FormatOpt = Format.text) -> None:
    """Register a GGUF file you already have (verified, then hard-linked or copied).

    Example: rbee-hive models import ~/Downloads/gemma-3-270m-q4_k_m.gguf --id gemma3-270m
    """
    from rbee_hive.render import render_model
    from rbee_hive.store import ModelStore

    with reporting(fmt) as report:
        record = ModelStore().import_file(path, model_id, copy, report)
    emit({"schema": schemas.MODEL, **record}, fmt, render_model)


@app.command()
def verify(model_id: Annotated[str, typer.Argument(metavar="ID")],
           fmt: FormatOpt = Format.text) -> None:
    """Re-check a model's GGUF header and sha256 against its registration.

    Example: rbee-hive models verify tinyllama
    """
    from rbee_hive.render import render_verify
    from rbee_hive.store import ModelStore

    with reporting(fmt) as report:
        result = ModelStore().verify(model_id, report)
    emit({"schema": schemas.VERIFY, **result}, fmt, render_verify)


@app.command()
def rm(model_id: Annotated[str, typer.Argument(metavar="ID")],
       force: Annotated[bool, typer.Option(help="Remove even if a worker serves it.")] = False,
       fmt: FormatOpt = Format.text) -> None:
    """Unregister a model and delete its file.

    Example: rbee-hive models rm tinyllama
    """
    from rbee_hive.render import render_removed
    from rbee_hive.store import ModelStore
    from rbee_hive.workers import users_of

    result = ModelStore().remove(model_id, users_of(model_id), force)
    emit({"schema": schemas.REMOVED, **result}, fmt, render_removed)
