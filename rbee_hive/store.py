"""The model store of one host: GGUF files under $RBEE_HOME/models and their index.

The index is one JSON file, rewritten atomically under a lock; a model is in the index
only once its file has been verified (GGUF header, size, sha256 when known). An index or an
entry that is not what this module writes is never trusted and never fatal: the file is
kept aside as `index.json.corrupt-<time>`, named in a warning, and the entry dropped.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
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
from rbee_hive.errors import (
    ChecksumMismatch,
    DiskFull,
    ModelInUse,
    disk_full,
    disk_full_as,
    is_disk_full,
)

log = logging.getLogger("rbee.hive.store")

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


# what every index entry holds, and of what type (bool is an int to Python: refused apart)
_FIELDS: dict[str, type] = {"id": str, "name": str, "source": str, "path": str, "size": int,
                            "sha256": str, "gguf": dict}


def entry_problem(key: str, entry: Any) -> str | None:
    """Why an index entry cannot be trusted; None when it can."""
    if not isinstance(entry, dict):
        return f"is a JSON {type(entry).__name__}, not an object"
    for field, kind in _FIELDS.items():
        value = entry.get(field)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"has no {field!r}" if field not in entry else \
                f"has a {field!r} that is not a {kind.__name__}"
    if entry["id"] != key or not ID_RE.fullmatch(key):
        return f"is filed under {key!r} but says it is {entry['id']!r}"
    offset = entry["gguf"].get("data_offset")
    if not isinstance(offset, int) or isinstance(offset, bool):
        return "has no integer gguf.data_offset"
    return None


def link_or_copy(src: Path, dst: Path, report: Reporter = null_reporter) -> bool:
    """Hard-link `src` at `dst`, or copy it where links cannot be made; True if linked."""
    try:
        os.link(src, dst)
        return True
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(dst, None, e) from e
    with disk_full_as(dst, src.stat().st_size):
        _copy_with_progress(src, dst, report)
    return False


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

    def _load(self) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """The index's trustworthy entries, and what is wrong with the rest of it."""
        doc = read_json(self.index_path, default={})  # unparseable: read_json sets it aside
        if not isinstance(doc, dict) or not isinstance(doc.get("models", {}), dict):
            return {}, ["it is not an object with a \"models\" object"]
        models, problems = {}, []
        for key, entry in doc.get("models", {}).items():
            problem = entry_problem(key, entry)
            if problem is None:
                models[key] = entry
            else:
                problems.append(f"entry {key!r} {problem}")
        return models, problems

    def _read(self) -> dict[str, dict[str, Any]]:
        models, problems = self._load()
        if problems:
            try:
                with locked(self.lock_path):
                    models = self._read_locked()
            except OSError as e:  # a store this user may read but not write
                log.warning("%s is damaged: %s; read it without those entries (%s)",
                            self.index_path, "; ".join(problems), e)
        return models

    def _read_locked(self) -> dict[str, dict[str, Any]]:
        """The index (with the lock held): a damaged one is kept aside and rewritten clean."""
        models, problems = self._load()
        if not problems:
            return models
        # the name rbee_common.files.set_aside gives an unparseable file
        aside = self.index_path.with_name(f"{self.index_path.name}.corrupt-"
                                          f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        try:
            os.link(self.index_path, aside)  # a second name costs no space on a full disk
            self._write(models)
            done = f"kept the damaged file as {aside} and rewrote the index without it"
        except (OSError, DiskFull) as e:
            done = f"could not set it aside ({e}); read it without those entries"
        log.warning("%s is damaged: %s; %s", self.index_path, "; ".join(problems), done)
        return models

    def _write(self, models: dict[str, dict[str, Any]]) -> None:
        doc = {"schema": INDEX_SCHEMA, "models": models}
        with disk_full_as(self.index_path, len(str(doc))):
            atomic_write_json(self.index_path, doc)

    def list(self) -> list[dict[str, Any]]:
        return sorted(self._read().values(), key=lambda m: m["id"])

    def get(self, model_id: str) -> dict[str, Any] | None:
        return self._read().get(model_id)

    def file_for(self, model_id: str) -> Path:
        return self.dir / f"{model_id}.gguf"

    def register(self, record: dict[str, Any]) -> dict[str, Any]:
        with locked(self.lock_path):
            models = self._read_locked()
            models[record["id"]] = record
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
        moved = _place(tmp, dest)
        try:
            record = self.register(model_record(spec.id, spec.name, str(spec.source), dest,
                                                sha256, info, revision))
        except BaseException:
            # not registered, so not in the store: give the file back to the caller (a
            # download's .part, which the next run registers without transferring again)
            with contextlib.suppress(OSError):
                if moved:
                    os.replace(dest, tmp)
                else:
                    dest.unlink()
            raise
        if not moved:
            tmp.unlink(missing_ok=True)
        return record

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
            if copy:
                with disk_full_as(tmp, src.stat().st_size):
                    _copy_with_progress(src, tmp, report)
            else:
                link_or_copy(src, tmp, report)
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
        """Delete a model's file, then its entry: the file first, so that on a full disk
        the rewrite of the index has the room the file leaves."""
        with locked(self.lock_path):
            models = self._read_locked()
            record = models.get(model_id)
            if record is None:
                raise ModelNotFound(f"model {model_id!r} is not registered on this host",
                                    hint="See `rbee-hive models list`.")
            if users and not force:
                raise ModelInUse(f"model {model_id!r} is served by worker(s) "
                                 f"{', '.join(users)}", workers=users)
            path = Path(record["path"])
            freed = 0
            if path.parent == self.dir:
                try:
                    st = path.stat()
                    path.unlink()
                    # bytes with another name (the imported original, the HF cache) stay
                    freed = st.st_size if st.st_nlink == 1 else 0
                except FileNotFoundError:
                    pass
            del models[model_id]
            self._write(models)
        return {"id": model_id, "removed": True, "path": str(path), "freed_bytes": freed}


def _place(tmp: Path, dest: Path) -> bool:
    """Put `tmp` at `dest`: renamed (True) or, across file systems, linked or copied with
    `tmp` left in place (False) until the caller is done with it."""
    try:
        os.replace(tmp, dest)
        return True
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    # downloads/ on another file system than models/ (a models dir symlinked elsewhere)
    staged = dest.with_name(f".{dest.name}.tmp")
    try:
        link_or_copy(tmp, staged)
        os.replace(staged, dest)
    finally:
        staged.unlink(missing_ok=True)
    return False


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
