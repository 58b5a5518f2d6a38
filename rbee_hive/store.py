"""The model store of one host: GGUF files under $RBEE_HOME/models and their index.

The index is one JSON file, rewritten atomically under a lock; a model is in the index
only once its files have been verified (GGUF header, size, sha256 when known).

A model is one file, `models/<id>.gguf`, or — published in several files by gguf-split —
the files `models/<id>.shards/<id>-00001-of-0000N.gguf` …, registered together as one
entry once all of them are verified: `path` is the first file (the one llama.cpp loads; it
finds the rest by name), `size` the bytes of all of them, `sha256` the first file's, and
`shards` lists every file (one entry for a single-file model). An index or an
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
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rbee_common.errors import ModelNotFound
from rbee_common.files import atomic_write_json, locked, read_json
from rbee_common.ggufmeta import GgufInfo, read_model_files
from rbee_common.models import ID_RE, ModelSpec, ShardMissing, check_id, split_of
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
    return sha256_files([path], report, phase, message)[0]


def sha256_files(paths: Sequence[Path], report: Reporter = null_reporter,
                 phase: str = "verify", message: str | None = None) -> list[str]:
    """sha256 of each file, with one progress bar over all of them."""
    total = sum(p.stat().st_size for p in paths)
    digests = []
    done = 0
    report({"event": "phase", "phase": phase, "message": message or f"Verifying {paths[0].name}",
            "total": total, "unit": "bytes"})
    for path in paths:
        h = hashlib.sha256()
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
                done += len(chunk)
                report({"event": "progress", "phase": phase, "completed": done})
        digests.append(h.hexdigest())
    report({"event": "done", "phase": phase})
    return digests


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
    shards = entry.get("shards")
    if shards is not None and not (
            isinstance(shards, list) and shards
            and all(isinstance(f, dict) and isinstance(f.get("path"), str)
                    and isinstance(f.get("sha256"), str) and isinstance(f.get("size"), int)
                    and not isinstance(f.get("size"), bool) for f in shards)
            and shards[0]["path"] == entry["path"]):
        return "has a 'shards' that is not a list of its files (path, size, sha256)"
    return None


def with_shards(entry: dict[str, Any]) -> dict[str, Any]:
    """An entry with its `shards` list (entries written before models had one: the file)."""
    if "shards" in entry:
        return entry
    return {**entry, "shards": [{"path": entry["path"], "size": entry["size"],
                                 "sha256": entry["sha256"]}]}


@dataclass(frozen=True)
class Piece:
    """One verified file of a model, waiting to be moved (or linked) into the store."""

    tmp: Path  # where its bytes are now
    sha256: str
    size: int


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


def model_record(spec_id: str, name: str, source: str, files: Sequence[tuple[Path, str]],
                 info: GgufInfo, revision: str | None = None) -> dict[str, Any]:
    """The index entry of a model in `files` ((path, sha256) each, the first file first)."""
    shards = [{"path": str(path), "size": path.stat().st_size, "sha256": digest}
              for path, digest in files]
    return {
        "id": spec_id,
        "name": name,
        "source": source,
        "revision": revision,
        "path": shards[0]["path"],
        "size": sum(f["size"] for f in shards),
        "sha256": shards[0]["sha256"],
        "shards": shards,
        "added_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "gguf": gguf_summary(info),
    }


def missing_files(record: dict[str, Any]) -> list[Path]:
    """The files of a registered model that are not on disk."""
    return [Path(f["path"]) for f in with_shards(record)["shards"]
            if not Path(f["path"]).is_file()]


def model_files(path: Path) -> list[Path]:
    """The files of the model whose file (any one, for a split model) is `path`, first first.

    SHARD_MISSING when a split model's file is not beside the one named.
    """
    split = split_of(path.name)
    if split is None or split.count == 1:
        return [path]
    files = [path.with_name(split.name(no)) for no in range(1, split.count + 1)]
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise ShardMissing(f"{', '.join(missing)} of the {split.count} files of "
                           f"{split.name(1)} {'is' if len(missing) == 1 else 'are'} not in "
                           f"{path.parent}", missing=missing, count=split.count)
    return files


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
        return sorted((with_shards(m) for m in self._read().values()), key=lambda m: m["id"])

    def get(self, model_id: str) -> dict[str, Any] | None:
        record = self._read().get(model_id)
        return with_shards(record) if record is not None else None

    def file_for(self, model_id: str) -> Path:
        return self.dir / f"{model_id}.gguf"

    def files_for(self, model_id: str, count: int) -> list[Path]:
        """Where a model of `count` files is kept: models/<id>.gguf, or gguf-split's names
        (which llama.cpp needs to find the files) in a folder of their own."""
        if count == 1:
            return [self.file_for(model_id)]
        folder = self.dir / f"{model_id}.shards"
        return [folder / f"{model_id}-{no:05d}-of-{count:05d}.gguf"
                for no in range(1, count + 1)]

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
        missing = missing_files(record)
        if missing:
            raise ShardMissing(f"{len(missing)} of the {len(record['shards'])} files of "
                               f"{spec.id!r} are missing: {', '.join(map(str, missing))}",
                               missing=[str(p) for p in missing],
                               hint=f"Remove it with `rbee-hive models rm {spec.id}` and "
                                    "download it again.")
        return record

    def finish(self, spec: ModelSpec, pieces: Sequence[Piece], info: GgufInfo,
               revision: str | None = None) -> dict[str, Any]:
        """Move verified files into place and register them as one model: the last step of
        every fetch. Until it is registered, every file can go back where it came from."""
        dests = self.files_for(spec.id, len(pieces))
        previous = self.get(spec.id)
        placed: list[tuple[Piece, Path, bool]] = []
        try:
            for piece, dest in zip(pieces, dests, strict=True):
                dest.parent.mkdir(parents=True, exist_ok=True)
                placed.append((piece, dest, _place(piece.tmp, dest)))
            record = self.register(model_record(
                spec.id, spec.name, str(spec.source),
                [(dest, piece.sha256) for piece, dest, _ in placed], info, revision))
        except BaseException:
            # not registered, so not in the store: give the files back to the caller (a
            # download's .part files, which the next run registers without transferring)
            for piece, dest, moved in placed:
                with contextlib.suppress(OSError):
                    if moved:
                        os.replace(dest, piece.tmp)
                    else:
                        dest.unlink()
            self._drop_empty_folder(dests[0].parent)
            raise
        for piece, _, moved in placed:
            if not moved:
                piece.tmp.unlink(missing_ok=True)
        if previous is not None:
            self._delete_files(previous, keep=set(dests))  # a model the new one replaced
        return record

    def _delete_files(self, record: dict[str, Any], keep: Collection[Path] = ()) -> int:
        """Delete the files of `record` that are in the store; the bytes this freed."""
        freed = 0
        for f in with_shards(record)["shards"]:
            path = Path(f["path"])
            if path in keep or not self._holds(path):
                continue  # an imported original stays where the user keeps it
            try:
                st = path.stat()
                path.unlink()
                # bytes with another name (the imported original, the HF cache) stay
                freed += st.st_size if st.st_nlink == 1 else 0
            except FileNotFoundError:
                pass
        self._drop_empty_folder(Path(record["path"]).parent)
        return freed

    def _holds(self, path: Path) -> bool:
        """Is `path` one of the store's own files (models/X.gguf, models/X.shards/…)?"""
        return path.parent == self.dir or self._is_shard_folder(path.parent)

    def _is_shard_folder(self, folder: Path) -> bool:
        return folder.parent == self.dir and folder.name.endswith(".shards")

    def _drop_empty_folder(self, folder: Path) -> None:
        if self._is_shard_folder(folder):
            with contextlib.suppress(OSError):  # not empty, or already gone
                folder.rmdir()

    def import_file(self, path: Path, model_id: str | None, copy: bool,
                    report: Reporter = null_reporter, sha256: str | None = None
                    ) -> dict[str, Any]:
        """Register a GGUF the user already has: verified, then hard-linked (or copied).

        A file of a split model brings every file of it (they must lie side by side under
        gguf-split's names). `sha256`, when given (a --sha256, or the catalog entry a
        download resolved), is the hash the (first) file must have; otherwise a catalog
        entry of the same id supplies it.
        """
        from rbee_common.catalog import load_catalog
        from rbee_common.models import FileSource, derive_id

        named = path.expanduser().resolve()
        if not named.is_file():
            raise ModelNotFound(f"no file at {named}", hint="Give the path of a .gguf file.")
        files = model_files(named)
        source = FileSource(str(files[0]))

        catalog = load_catalog()
        mid = check_id(model_id or derive_id(source))
        entry = catalog.get(mid)
        info = read_model_files(files)  # NOT_A_GGUF, SHARD_MISMATCH before any copying
        what = files[0].name if len(files) == 1 else f"the {len(files)} files of {files[0].name}"
        digests = sha256_files(files, report, message=f"Hashing {what}")
        digest = digests[0]
        if sha256 is not None and sha256 != digest:
            raise ChecksumMismatch(
                f"{files[0].name}: sha256 {digest[:16]}… is not the expected {sha256[:16]}…; "
                "nothing was registered", expected=sha256, actual=digest)
        if sha256 is None and entry is not None and entry.sha256 and entry.sha256 != digest:
            raise ChecksumMismatch(
                f"{files[0].name} does not match catalog entry {mid!r}: sha256 {digest[:12]}…, "
                f"expected {entry.sha256[:12]}…", expected=entry.sha256, actual=digest,
                hint=f"Import it under another id with --id, or fetch {mid!r} with "
                     "`rbee-hive models download`.")
        split = split_of(files[0].name)
        name = entry.name if entry is not None else (
            info.name or (split.prefix if split else files[0].stem))
        spec = ModelSpec(mid, name, source, digest, sum(f.stat().st_size for f in files))
        self.dir.mkdir(parents=True, exist_ok=True)
        tmps = [self.dir / f".{mid}.{no}.import.tmp" for no in range(1, len(files) + 1)]
        try:
            for src, tmp in zip(files, tmps, strict=True):
                tmp.unlink(missing_ok=True)
                if copy:
                    with disk_full_as(tmp, src.stat().st_size):
                        _copy_with_progress(src, tmp, report)
                else:
                    link_or_copy(src, tmp, report)
            pieces = [Piece(tmp, d, tmp.stat().st_size)
                      for tmp, d in zip(tmps, digests, strict=True)]
            return self.finish(spec, pieces, info)
        finally:
            for tmp in tmps:
                tmp.unlink(missing_ok=True)

    def verify(self, model_id: str, report: Reporter = null_reporter) -> dict[str, Any]:
        record = self.get(model_id)
        if record is None:
            raise ModelNotFound(f"model {model_id!r} is not registered on this host",
                                hint="See `rbee-hive models list`.")
        missing = missing_files(record)
        if missing:
            raise ModelNotFound(f"the file of {model_id!r} is missing: {missing[0]}",
                                hint=f"Remove it with `rbee-hive models rm {model_id}` and "
                                     "download it again.")
        shards = record["shards"]
        paths = [Path(f["path"]) for f in shards]
        read_model_files(paths)
        actual = sha256_files(paths, report)
        for f, digest in zip(shards, actual, strict=True):
            if digest != f["sha256"]:
                raise ChecksumMismatch(
                    f"{model_id}: sha256 of {Path(f['path']).name} is {digest[:12]}…, "
                    f"registered as {f['sha256'][:12]}…", expected=f["sha256"], actual=digest,
                    hint=f"The file changed on disk. Remove it with `rbee-hive models rm "
                         f"{model_id}` and download it again.")
        return {"id": model_id, "ok": True, "sha256": actual[0],
                "size": sum(p.stat().st_size for p in paths)}

    def remove(self, model_id: str, users: list[str], force: bool) -> dict[str, Any]:
        """Delete a model's files, then its entry: the files first, so that on a full disk
        the rewrite of the index has the room the files leave."""
        with locked(self.lock_path):
            models = self._read_locked()
            record = models.get(model_id)
            if record is None:
                raise ModelNotFound(f"model {model_id!r} is not registered on this host",
                                    hint="See `rbee-hive models list`.")
            if users and not force:
                raise ModelInUse(f"model {model_id!r} is served by worker(s) "
                                 f"{', '.join(users)}", workers=users)
            freed = self._delete_files(record)
            del models[model_id]
            self._write(models)
        return {"id": model_id, "removed": True, "path": record["path"], "freed_bytes": freed}


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
