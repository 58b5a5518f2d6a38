"""The user's Hugging Face cache, used as huggingface_hub uses it, so `hf` and rbee share bytes.

Layout (huggingface_hub's documented cache, `hf cache scan` reads it):

    $HF_HUB_CACHE/models--ORG--REPO/blobs/<etag>                  the bytes
    $HF_HUB_CACHE/models--ORG--REPO/snapshots/<commit>/<path>     a relative symlink to the blob
    $HF_HUB_CACHE/models--ORG--REPO/refs/<revision>               the commit a branch or tag names

rbee reads a file from there when it is present (online: the blob of the etag the Hub names;
offline, HF_HUB_OFFLINE=1: whatever the revision's ref points at) and, after its own
resumable download, files the verified bytes there as a hard link, so a later `hf download`
finds them. Where the cache is on another file system nothing is copied into it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from rbee_common.files import atomic_write_bytes
from rbee_common.models import HfSource

log = logging.getLogger("rbee.hive.hfcache")


def hub_cache_dir() -> Path:
    """huggingface_hub's cache dir, resolved from the environment now (it reads it at import)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub reads it."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def repo_dir(src: HfSource) -> Path:
    """The cache folder of the source's repository (models--ORG--REPO)."""
    from huggingface_hub.file_download import repo_folder_name

    return hub_cache_dir() / repo_folder_name(repo_id=src.repo, repo_type="model")


def blob_for(src: HfSource, etag: str) -> Path | None:
    """The cached blob the Hub's etag names, if the cache has it."""
    blob = repo_dir(src) / "blobs" / etag
    return blob if blob.is_file() else None


def cached_file(src: HfSource) -> tuple[Path, str] | None:
    """(blob, commit) of the file the cache holds for the source's revision, if any."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(src.repo, src.path, cache_dir=str(hub_cache_dir()),
                                   revision=src.revision)
    if not isinstance(found, str):
        return None
    pointer = Path(found)
    commit = pointer.relative_to(repo_dir(src) / "snapshots").parts[0]
    return pointer.resolve(), commit


def share(src: HfSource, file: Path, etag: str, commit: str) -> Path | None:
    """File the verified `file` in the cache as `hf download` would have; best effort.

    The blob is a hard link (no second copy); where that cannot be made (another file
    system, a read-only cache) the cache is left as it was. Returns the blob path if the
    cache now holds the file.
    """
    rdir = repo_dir(src)
    blob = rdir / "blobs" / etag
    pointer = rdir / "snapshots" / commit / src.path
    try:
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            os.link(file, blob)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        if not pointer.exists():
            staged = pointer.with_name(f".{pointer.name}.rbee.tmp")
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
            staged.symlink_to(os.path.relpath(blob, pointer.parent))
            os.replace(staged, pointer)
        if src.revision != commit:
            ref = rdir / "refs" / src.revision
            if not ref.is_file() or ref.read_text() != commit:
                atomic_write_bytes(ref, commit.encode())
    except OSError as e:
        log.info("not filing %s in the Hugging Face cache %s: %s", src, rdir, e)
        return None
    return blob
