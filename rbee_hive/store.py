"""The model store of one host: GGUF files under $RBEE_HOME/models and their index.

The index is one JSON file, rewritten atomically under a lock; a model is in the index
only once its file has been verified (GGUF header, size, sha256 when known).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

from rbee_common.errors import ModelNotFound
from rbee_common.files import atomic_write_json, locked, read_json
from rbee_common.ggufmeta import GgufInfo, read_gguf_file
from rbee_common.models import ID_RE, ModelSpec, check_id
from rbee_common.paths import rbee_home
from rbee_common.progress import Reporter, null_reporter
from rbee_hive.errors import ChecksumMismatch, ModelInUse

INDEX_SCHEMA = "rbee.hive.model-index/v1"
HASH_CHUNK = 4 * 1024 * 1024


def downloads_dir() -> Path:
    return rbee_home() / "downloads"


def sha256_file(path: Path, report: Reporter = null_reporter, phase: str = "verify",
                message: str | None = None) -> str:
    """sha256 of a file, reporting progress (a 4 GB model takes a few seconds)."""
    total = path.stat().st_size
    h = hashlib.sha256()
    done = 0
    report({"event": "phase", "phase": phase, "message": message or f"Verifying {path.name}",
            "total": total, "unit": "bytes"})
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
            done += len(chunk)
            report({"event": "progress", "phase": phase, "completed": done})
    report({"event": "done", "phase": phase})
    return h.hexdigest()


def gguf_summary(info: GgufInfo) -> dict[str, Any]:
    return info.to_dict()


def model_record(spec_id: str, name: str, source: str, path: Path, sha256: str,
                 info: GgufInfo, revision: str | None = None) -> dict[str, Any]:
    return {
        "id": spec_id,
        "name": name,
        "source": source,
        "revision": revision,
        "path": str(path),
        "size": path.stat().st_size,
        "sha256": sha256,
        "added_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "gguf": gguf_summary(info),
    }


class ModelStore:
    """Registered models of this host. Every method re-reads the index: no stale caches."""

    def __init__(self, home: Path | None = None) -> None:
        self.dir = (home or rbee_home()) / "models"
        self.index_path = self.dir / "index.json"
        self.lock_path = self.dir / ".index.lock"

    def _read(self) -> dict[str, dict[str, Any]]:
        doc = read_json(self.index_path, default={}) or {}
        return dict(doc.get("models", {}))

    def _write(self, models: dict[str, dict[str, Any]]) -> None:
        atomic_write_json(self.index_path, {"schema": INDEX_SCHEMA, "models": models})

    def list(self) -> list[dict[str, Any]]:
        return sorted(self._read().values(), key=lambda m: m["id"])

    def get(self, model_id: str) -> dict[str, Any] | None:
        return self._read().get(model_id)

    def file_for(self, model_id: str) -> Path:
        return self.dir / f"{model_id}.gguf"

    def register(self, record: dict[str, Any]) -> dict[str, Any]:
        with locked(self.lock_path):
            models = self._read()
            models[record["id"]] = record
            self._write(models)
        return record

    def unregister(self, model_id: str) -> dict[str, Any] | None:
        with locked(self.lock_path):
            models = self._read()
            record = models.pop(model_id, None)
            if record is not None:
                self._write(models)
        return record

    def resolve(self, ref: str) -> tuple[ModelSpec, dict[str, Any] | None]:
        """A reference → what it means, and its record if it is already here."""
        local = self.get(ref) if ID_RE.match(ref) else None
        if local is not None:
            from rbee_common.models import parse_source

            try:
                source = parse_source(local["source"])
            except Exception:  # imported files keep their original path as the source
                source = parse_source(f"file:{local['path']}")
            return ModelSpec(local["id"], local["name"], source, local.get("sha256"),
                             local.get("size")), local
        from rbee_common.catalog import resolve_ref  # pydantic: not on `status`'s path

        spec = resolve_ref(ref)
        record = self.get(spec.id)
        if record is not None and record["source"] != str(spec.source):
            record = None  # same id, another file: not what was asked for
        return spec, record

    def require(self, ref: str) -> dict[str, Any]:
        """The record of a model that must already be on this host."""
        spec, record = self.resolve(ref)
        if record is None or not Path(record["path"]).is_file():
            raise ModelNotFound(f"model {spec.id!r} is not on this host",
                                hint=f"Download it first: rbee-hive models download {ref}")
        return record

    def finish(self, spec: ModelSpec, tmp: Path, sha256: str, info: GgufInfo,
               revision: str | None = None) -> dict[str, Any]:
        """Move a verified file into place and register it: the last step of every fetch."""
        dest = self.file_for(spec.id)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
        return self.register(model_record(spec.id, spec.name, str(spec.source), dest, sha256,
                                          info, revision))

    def import_file(self, path: Path, model_id: str | None, copy: bool,
                    report: Reporter = null_reporter, sha256: str | None = None
                    ) -> dict[str, Any]:
        """Register a GGUF the user already has: verified, then hard-linked (or copied).

        `sha256`, when given (a --sha256, or the catalog entry a download resolved), is the
        hash the file must have; otherwise a catalog entry of the same id supplies it.
        """
        from rbee_common.models import FileSource, derive_id

        src = path.expanduser().resolve()
        if not src.is_file():
            raise ModelNotFound(f"no file at {src}", hint="Give the path of a .gguf file.")
        from rbee_common.catalog import load_catalog

        source = FileSource(str(src))
        catalog = load_catalog()
        mid = check_id(model_id or derive_id(source))
        entry = catalog.get(mid)
        info = read_gguf_file(src)  # NOT_A_GGUF before any copying
        digest = sha256_file(src, report, message=f"Hashing {src.name}")
        if sha256 is not None and sha256 != digest:
            raise ChecksumMismatch(
                f"{src.name}: sha256 {digest[:16]}… is not the expected {sha256[:16]}…; "
                "nothing was registered", expected=sha256, actual=digest)
        if sha256 is None and entry is not None and entry.sha256 and entry.sha256 != digest:
            raise ChecksumMismatch(
                f"{src.name} does not match catalog entry {mid!r}: sha256 {digest[:12]}…, "
                f"expected {entry.sha256[:12]}…", expected=entry.sha256, actual=digest,
                hint=f"Import it under another id with --id, or fetch {mid!r} with "
                     "`rbee-hive models download`.")
        name = entry.name if entry is not None else (info.name or src.stem)
        spec = ModelSpec(mid, name, source, digest, src.stat().st_size)
        tmp = self.dir / f".{mid}.import.tmp"
        self.dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            linked = False
            if not copy:
                try:
                    os.link(src, tmp)
                    linked = True
                except OSError:
                    linked = False
            if not linked:
                _copy_with_progress(src, tmp, report)
            return self.finish(spec, tmp, digest, info)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def verify(self, model_id: str, report: Reporter = null_reporter) -> dict[str, Any]:
        record = self.get(model_id)
        if record is None:
            raise ModelNotFound(f"model {model_id!r} is not registered on this host",
                                hint="See `rbee-hive models list`.")
        path = Path(record["path"])
        if not path.is_file():
            raise ModelNotFound(f"the file of {model_id!r} is missing: {path}",
                                hint=f"Remove it with `rbee-hive models rm {model_id}` and "
                                     "download it again.")
        read_gguf_file(path)
        actual = sha256_file(path, report)
        if actual != record["sha256"]:
            raise ChecksumMismatch(f"{model_id}: sha256 is {actual[:12]}…, registered as "
                                   f"{record['sha256'][:12]}…", expected=record["sha256"],
                                   actual=actual,
                                   hint=f"The file changed on disk. Remove it with `rbee-hive "
                                        f"models rm {model_id}` and download it again.")
        return {"id": model_id, "ok": True, "sha256": actual, "size": path.stat().st_size}

    def remove(self, model_id: str, users: list[str], force: bool) -> dict[str, Any]:
        record = self.get(model_id)
        if record is None:
            raise ModelNotFound(f"model {model_id!r} is not registered on this host",
                                hint="See `rbee-hive models list`.")
        if users and not force:
            raise ModelInUse(f"model {model_id!r} is served by worker(s) {', '.join(users)}",
                             workers=users)
        self.unregister(model_id)
        path = Path(record["path"])
        if path.parent == self.dir:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return {"id": model_id, "removed": True, "path": str(path),
                "freed_bytes": record.get("size", 0)}


def _copy_with_progress(src: Path, dst: Path, report: Reporter) -> None:
    total = src.stat().st_size
    report({"event": "phase", "phase": "copy", "message": f"Copying {src.name}", "total": total,
            "unit": "bytes"})
    done = 0
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while chunk := fi.read(HASH_CHUNK):
            fo.write(chunk)
            done += len(chunk)
            report({"event": "progress", "phase": "copy", "completed": done})
        fo.flush()
        os.fsync(fo.fileno())
    shutil.copystat(src, dst)
    report({"event": "done", "phase": "copy"})
