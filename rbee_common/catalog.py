"""The model catalog (the shipped catalog.toml with the user's merged over it), and how a
reference resolves through it."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from rbee_common.config import load_toml, locate_line, validate
from rbee_common.errors import ConfigInvalid, InvalidModelRef, ModelNotFound
from rbee_common.models import ID_RE, ModelSpec, Source, derive_id, parse_source
from rbee_common.paths import config_dir, repo_root


class CatalogEntry(BaseModel):
    """One `[[models]]` table of catalog.toml.

    For a model published in several files, `source` names any one of them (it means them
    all), `sha256` is its first file's and `size` the bytes of all of them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=ID_RE.pattern)
    name: str
    source: str
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    size: int | None = Field(default=None, gt=0)
    license: str | None = None
    description: str | None = None
    ttl: float | None = Field(default=None, ge=0)  # seconds an idle worker is kept (queen)

    def parsed_source(self) -> Source:
        return parse_source(self.source)


class CatalogFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[CatalogEntry] = []


def shipped_catalog_path() -> Path:
    root = repo_root()
    for candidate in (root / "catalog.toml", root / "rbee_hive" / "data" / "catalog.toml"):
        if candidate.is_file():
            return candidate
    return root / "catalog.toml"


def user_catalog_path() -> Path:
    return config_dir() / "catalog.toml"


def _read_catalog(path: Path) -> list[CatalogEntry]:
    data, text = load_toml(path)
    parsed = validate(CatalogFile, data, path, text)
    for n, entry in enumerate(parsed.models):
        try:
            entry.parsed_source()
        except InvalidModelRef as e:
            line = locate_line(text, ("models", n, "source"))
            raise ConfigInvalid(f"{path}:{line}: models.{n}.source: {e.message}",
                                file=str(path), line=line, field=f"models.{n}.source") from e
    return parsed.models


def load_catalog() -> dict[str, CatalogEntry]:
    """The shipped catalog with the user's catalog.toml merged over it (same id: user wins)."""
    merged: dict[str, CatalogEntry] = {}
    for path in (shipped_catalog_path(), user_catalog_path()):
        if path.is_file():
            for entry in _read_catalog(path):
                merged[entry.id] = entry
    return merged


def resolve_ref(ref: str, catalog: dict[str, CatalogEntry] | None = None) -> ModelSpec:
    """Resolve a catalog id or a source reference; unknown ids are MODEL_NOT_FOUND."""
    if catalog is None:
        catalog = load_catalog()
    if ref in catalog:
        e = catalog[ref]
        return ModelSpec(e.id, e.name, e.parsed_source(), e.sha256, e.size)
    if ID_RE.match(ref):
        raise ModelNotFound(f"no model {ref!r} in the catalog",
                            hint="See `rbee-hive models catalog`, or name a source: "
                                 "hf:ORG/REPO/FILE.gguf, https://…/FILE.gguf, file:/path.gguf.")
    source = parse_source(ref)
    for e in catalog.values():
        if str(e.parsed_source()) == str(source):
            return ModelSpec(e.id, e.name, source, e.sha256, e.size)
    return ModelSpec(derive_id(source), source.filename, source)
