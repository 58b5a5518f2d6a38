"""Fetch a model into the store: resumable across runs, verified before it is registered.

    hf:    huggingface_hub resolves the file (commit, size, the Hub's sha256, CDN location);
    https: a HEAD request does;
then one loop transfers `downloads/<id>.part` with HTTP Range + If-Range, so a download
cut by Ctrl+C, a killed process, a dropped connection or a full disk continues from the
bytes on disk. A dropped connection is also retried within the run (RBEE_DOWNLOAD_RETRIES,
default 3).

An hf: file already in the user's Hugging Face cache is taken from there (a hard link, no
transfer; offline with HF_HUB_OFFLINE=1 too), and a file rbee downloads is filed there, so
`hf download` and rbee share one copy (rbee_hive.hfcache).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from rbee_common.errors import Interrupted, ModelNotFound
from rbee_common.files import atomic_write_json, read_json
from rbee_common.ggufmeta import NotAGguf, read_gguf_file
from rbee_common.models import FileSource, HfSource, ModelSpec, UrlSource, check_id
from rbee_common.progress import Reporter, null_reporter
from rbee_hive import hfcache
from rbee_hive.errors import (
    ChecksumMismatch,
    DiskFull,
    DownloadFailed,
    disk_full,
    disk_full_as,
    is_disk_full,
)
from rbee_hive.store import HASH_CHUNK, ModelStore, downloads_dir, link_or_copy, sha256_file

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("rbee.hive.download")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Remote:
    """Where the bytes are, and what the server vouches for."""

    url: str
    headers: dict[str, str]
    size: int | None
    sha256: str | None
    validator: str | None  # ETag or Last-Modified, for If-Range
    revision: str | None = None
    etag: str | None = None  # the Hub's name for the file's bytes (its cache blob's name)


class HubUnreachable(DownloadFailed):
    """The Hub did not answer (network, or a 5xx): a cached copy may serve instead."""


@dataclass(frozen=True)
class Transfer:
    """What one run's transfer left: the file's hash and size, and how it got there."""

    sha256: str
    size: int
    resumed_from: int  # bytes of earlier runs the file kept (0 when they were discarded)
    transferred: int  # bytes this run received


def default_retries() -> int:
    from rbee_common.config import env_number

    return int(env_number("RBEE_DOWNLOAD_RETRIES", 3))


def fetch(spec: ModelSpec, store: ModelStore, report: Reporter = null_reporter,
          retries: int | None = None) -> dict[str, Any]:
    """Make `spec` present on this host; return its record plus what this run transferred."""
    check_id(spec.id)  # before any path is built from it
    if isinstance(spec.source, FileSource):
        record = store.import_file(Path(spec.source.path), spec.id, copy=False, report=report,
                                   sha256=spec.sha256)
        return {**record, "transferred_bytes": 0, "resumed_from": 0, "already_present": False}
    present = _present(spec, store)
    if present is not None:
        return present
    dl = downloads_dir()
    try:
        dl.mkdir(parents=True, exist_ok=True)
        with _download_lock(dl / f"{spec.id}.lock", spec.id, report):
            present = _present(spec, store)  # another process may have finished it meanwhile
            if present is not None:
                return present
            return _fetch_locked(spec, store, report, default_retries() if retries is None
                                 else retries)
    except OSError as e:
        # a write no narrower handler named (a lock file, a directory): still DISK_FULL
        if is_disk_full(e):
            raise disk_full(Path(e.filename) if e.filename else dl, spec.size, e) from e
        raise


def _present(spec: ModelSpec, store: ModelStore) -> dict[str, Any] | None:
    record = store.get(spec.id)
    if record and record["source"] == str(spec.source) and Path(record["path"]).is_file():
        return {**record, "transferred_bytes": 0, "resumed_from": 0, "already_present": True}
    return None


@contextlib.contextmanager
def _download_lock(path: Path, model_id: str, report: Reporter):  # type: ignore[no-untyped-def]
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report({"event": "log", "message": f"Waiting for another download of {model_id}…"})
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _client() -> httpx.Client:
    import httpx

    from rbee_common import __version__

    return httpx.Client(follow_redirects=True, timeout=httpx.Timeout(60.0, connect=10.0),
                        headers={"User-Agent": f"rbee/{__version__}",
                                 "Accept-Encoding": "identity"})


def _fetch_locked(spec: ModelSpec, store: ModelStore, report: Reporter,
                  retries: int) -> dict[str, Any]:
    dl = downloads_dir()
    part, meta_path = dl / f"{spec.id}.part", dl / f"{spec.id}.json"
    started = time.monotonic()
    if isinstance(spec.source, HfSource) and hfcache.offline():
        return _from_hf_cache(spec, store, None, report, part, meta_path)
    with _client() as client:
        try:
            remote = _resolve(spec, client)
        except HubUnreachable:
            if not isinstance(spec.source, HfSource) or hfcache.cached_file(spec.source) is None:
                raise
            # the Hub is out of reach: the cached file of this revision serves, as in `hf`
            report({"event": "log", "message": "The Hub is out of reach; using the file in "
                                               "the Hugging Face cache."})
            return _from_hf_cache(spec, store, None, report, part, meta_path)
        if isinstance(spec.source, HfSource) and remote.etag \
                and hfcache.blob_for(spec.source, remote.etag) is not None:
            try:
                return _from_hf_cache(spec, store, remote, report, part, meta_path)
            except (NotAGguf, ChecksumMismatch) as e:
                # a damaged cache entry: fetch the file afresh rather than trust it
                log.warning("the Hugging Face cache's copy of %s does not verify (%s); "
                            "downloading it", spec.source, e)
        meta = {"source": str(spec.source), "validator": remote.validator, "size": remote.size}
        previous = read_json(meta_path)
        if part.exists() and previous != meta:
            # the remote file is not the one the partial bytes came from: start over
            part.unlink()
        with disk_full_as(meta_path, None):
            atomic_write_json(meta_path, meta)
        try:
            done = _transfer(spec, remote, part, client, report, retries)
        except KeyboardInterrupt:
            kept = part.stat().st_size if part.exists() else 0
            raise Interrupted(f"download of {spec.id} interrupted; {kept} bytes kept",
                              hint="Run the same command again to resume.") from None
    try:
        info = _verify(spec, remote, part, done.size, done.sha256)
    except (NotAGguf, ChecksumMismatch):
        # a wrong file must not be resumed into: drop it so the next run starts clean
        part.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
        raise
    if isinstance(spec.source, HfSource) and remote.etag and remote.revision:
        hfcache.share(spec.source, part, remote.etag, remote.revision)
    record = store.finish(spec, part, done.sha256, info, remote.revision)
    meta_path.unlink(missing_ok=True)
    elapsed = time.monotonic() - started
    return {**record, "transferred_bytes": done.transferred, "resumed_from": done.resumed_from,
            "already_present": False, "elapsed_s": round(elapsed, 3)}


def _from_hf_cache(spec: ModelSpec, store: ModelStore, remote: Remote | None, report: Reporter,
                   part: Path, meta_path: Path) -> dict[str, Any]:
    """Register the file the Hugging Face cache holds: verified, then hard-linked (or copied).

    With `remote` (online) the blob is the one the Hub names now; without (offline, or the
    Hub out of reach) it is the one the revision's ref names in the cache.
    """
    src = spec.source
    assert isinstance(src, HfSource)
    if remote is not None:
        assert remote.etag is not None
        blob, commit, vouched = hfcache.blob_for(src, remote.etag), remote.revision, remote.sha256
    else:
        found = hfcache.cached_file(src)
        if found is None:
            raise DownloadFailed(
                f"HF_HUB_OFFLINE is set and {src} is not in the Hugging Face cache "
                f"({hfcache.hub_cache_dir()})",
                hint=f"Fetch it once while online (`rbee-hive models download {src}` or "
                     f"`hf download {src.repo} {src.path}`), or unset HF_HUB_OFFLINE.")
        blob, commit = found
        vouched = blob.name if _SHA256.match(blob.name) else None  # an LFS blob's name
    assert blob is not None
    started = time.monotonic()
    digest = sha256_file(blob, report, message=f"Verifying {src.path} from the Hugging Face "
                                               "cache")
    info = _verify(spec, Remote(url="", headers={}, size=None, sha256=vouched, validator=None),
                   blob, blob.stat().st_size, digest)
    tmp = store.dir / f".{spec.id}.hfcache.tmp"
    store.dir.mkdir(parents=True, exist_ok=True)
    tmp.unlink(missing_ok=True)
    try:
        link_or_copy(blob, tmp, report)
        record = store.finish(spec, tmp, digest, info, commit)
    finally:
        tmp.unlink(missing_ok=True)
    # a partial download of the same file is no longer needed
    part.unlink(missing_ok=True)
    meta_path.unlink(missing_ok=True)
    report({"event": "log", "message": f"Took {src.path} from the Hugging Face cache ({blob})"})
    return {**record, "transferred_bytes": 0, "resumed_from": 0, "already_present": False,
            "elapsed_s": round(time.monotonic() - started, 3)}


def _resolve(spec: ModelSpec, client: httpx.Client) -> Remote:
    if isinstance(spec.source, HfSource):
        return _resolve_hf(spec.source)
    assert isinstance(spec.source, UrlSource)
    return _resolve_url(spec.source, client)


def _resolve_hf(src: HfSource) -> Remote:
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    # HF_ENDPOINT is read once at import by huggingface_hub; pass it at call time instead
    endpoint = os.environ.get("HF_ENDPOINT") or None
    url = hf_hub_url(src.repo, src.path, revision=src.revision, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(url, endpoint=endpoint, timeout=30)
    except hf_errors.GatedRepoError as e:
        raise DownloadFailed(f"{src.repo} is gated: accept its licence on the Hub first",
                             hint="Log in with `hf auth login` or set HF_TOKEN.") from e
    except hf_errors.RevisionNotFoundError as e:
        raise ModelNotFound(f"revision {src.revision!r} of {src.repo} does not exist",
                            hint="Check the @REVISION part of the reference.") from e
    except hf_errors.RepositoryNotFoundError as e:
        raise ModelNotFound(f"repository {src.repo} does not exist on the Hub (or is private)",
                            hint="Check the spelling, or log in with `hf auth login`.") from e
    except hf_errors.EntryNotFoundError as e:
        raise ModelNotFound(f"{src.path} is not in {src.repo}@{src.revision}",
                            hint=f"List its files at https://huggingface.co/{src.repo}/tree/"
                                 f"{src.revision}") from e
    except hf_errors.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else 0
        cls = HubUnreachable if status >= 500 else DownloadFailed
        raise cls(f"the Hub refused {src}: {_first_line(e)}") from e
    except Exception as e:  # connection errors of huggingface_hub's HTTP client
        raise HubUnreachable(f"cannot reach the Hub for {src}: {type(e).__name__}: "
                             f"{_first_line(e)}",
                             hint="Check the network (and HF_ENDPOINT if you set one).") from e
    headers = build_hf_headers()
    location = meta.location
    if urlsplit(location).netloc != urlsplit(url).netloc:
        headers.pop("authorization", None)  # never hand the Hub token to a CDN
    etag = meta.etag if meta.etag and _SHA256.match(meta.etag) else None
    return Remote(url=location, headers=dict(headers), size=meta.size, sha256=etag,
                  validator=f'"{meta.etag}"' if meta.etag else None,
                  revision=meta.commit_hash, etag=meta.etag or None)


def _resolve_url(src: UrlSource, client: httpx.Client) -> Remote:
    import httpx

    try:
        r = client.head(src.url)
    except httpx.HTTPError as e:
        raise DownloadFailed(f"cannot reach {urlsplit(src.url).netloc}: {e}") from e
    if r.status_code == 404:
        raise ModelNotFound(f"{src.url} does not exist (HTTP 404)",
                            hint="Check the address.")
    if r.status_code >= 400 and r.status_code not in (405, 501):
        raise DownloadFailed(f"{src.url}: HTTP {r.status_code}")
    size = r.headers.get("content-length")
    etag = r.headers.get("etag")
    validator = etag if etag and not etag.startswith("W/") else r.headers.get("last-modified")
    return Remote(url=str(r.url), headers={}, size=int(size) if size and size.isdigit() else None,
                  sha256=None, validator=validator)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _hash_prefix(part: Path) -> hashlib._Hash:
    h = hashlib.sha256()
    if part.exists() and part.stat().st_size:
        with open(part, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
    return h


def _transfer(spec: ModelSpec, remote: Remote, part: Path, client: httpx.Client,
              report: Reporter, retries: int) -> Transfer:
    """Append the missing bytes to `part`; return what the whole file and this run came to."""
    import httpx

    hasher = _hash_prefix(part)
    offset = part.stat().st_size if part.exists() else 0
    resumed_from, received = offset, 0
    total = remote.size or spec.size
    phase = "download"
    report({"event": "phase", "phase": phase, "message": f"Downloading {spec.id}",
            "total": total, "completed": offset, "unit": "bytes"})
    if offset:
        report({"event": "log", "message": f"Resuming {spec.id} from byte {offset}"})

    def start_over() -> None:
        nonlocal hasher, offset, resumed_from
        part.unlink(missing_ok=True)
        hasher, offset, resumed_from = hashlib.sha256(), 0, 0

    attempt = 0
    while True:
        if total is not None and offset == total:
            break
        if total is not None and offset > total:
            start_over()  # more bytes than the file has: not a prefix of it
        headers = dict(remote.headers)
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if remote.validator:
                headers["If-Range"] = remote.validator
        try:
            with client.stream("GET", remote.url, headers=headers) as r:
                if r.status_code == 404:
                    raise ModelNotFound(f"{spec.source} does not exist (HTTP 404)")
                if r.status_code == 416 and offset:
                    start_over()  # our bytes no longer describe the remote file
                    continue
                if r.status_code == 200 and offset:
                    # the server sent the whole file (changed, or no Range support)
                    start_over()
                elif r.status_code == 206:
                    start = _range_start(r.headers.get("content-range", ""))
                    if start != offset:
                        raise DownloadFailed(f"the server resumed at byte {start}, not {offset}")
                elif r.status_code != 200:
                    raise DownloadFailed(f"{_redact(remote.url)}: HTTP {r.status_code}")
                if total is None and r.headers.get("content-length", "").isdigit():
                    total = offset + int(r.headers["content-length"])
                    report({"event": "progress", "phase": phase, "total": total,
                            "completed": offset})
                try:
                    with open(part, "ab") as f:
                        for chunk in r.iter_raw():
                            f.write(chunk)
                            hasher.update(chunk)
                            offset += len(chunk)
                            received += len(chunk)
                            report({"event": "progress", "phase": phase, "completed": offset})
                        f.flush()
                        os.fsync(f.fileno())
                except OSError as e:
                    if not is_disk_full(e):
                        raise
                    # what reached the disk is a prefix of the file: the next run resumes it
                    kept = part.stat().st_size if part.exists() else 0
                    err = disk_full(part, total - kept if total is not None else None, e)
                    raise DiskFull(f"{err.message}; {kept} bytes of {spec.id} kept",
                                   **{**err.details, "kept_bytes": kept}) from e
                if total is None:
                    total = offset
        except httpx.TransportError as e:
            attempt += 1
            if attempt > retries:
                raise DownloadFailed(
                    f"download of {spec.id} failed after {retries} retries: {e or type(e).__name__}"
                    f" ({offset} of {total or '?'} bytes kept)", kept_bytes=offset) from e
            report({"event": "log", "message": f"Connection lost at byte {offset} ({e}); "
                                               f"resuming, attempt {attempt}/{retries}"})
            time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
    report({"event": "done", "phase": phase})
    return Transfer(hasher.hexdigest(), offset, resumed_from, received)


def _range_start(content_range: str) -> int | None:
    m = re.match(r"bytes (\d+)-", content_range)
    return int(m.group(1)) if m else None


def _redact(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _verify(spec: ModelSpec, remote: Remote, part: Path, size: int, digest: str) -> Any:
    expected_size = spec.size or remote.size
    if expected_size is not None and size != expected_size:
        raise ChecksumMismatch(f"{spec.id}: got {size} bytes, expected {expected_size}",
                               expected_size=expected_size, actual_size=size)
    info = read_gguf_file(part)
    for expected, who in ((spec.sha256, "the catalog"), (remote.sha256, "the server")):
        if expected and expected != digest:
            raise ChecksumMismatch(
                f"{spec.id}: sha256 {digest[:16]}… does not match {who} ({expected[:16]}…); "
                "the file was discarded", expected=expected, actual=digest)
    return info


def with_id(spec: ModelSpec, model_id: str | None) -> ModelSpec:
    """`spec` stored under `model_id` (checked against the id rule) when one is given."""
    return replace(spec, id=check_id(model_id)) if model_id else spec
