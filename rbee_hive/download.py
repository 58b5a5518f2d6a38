"""Fetch a model into the store: resumable across runs, verified before it is registered.

    hf:    huggingface_hub resolves the file (commit, size, the Hub's sha256, CDN location);
    https: a HEAD request does;
then one loop transfers `downloads/<id>.part` with HTTP Range + If-Range, so a download
cut by Ctrl+C, a killed process, a dropped connection or a full disk continues from the
bytes on disk. A dropped connection is also retried within the run (RBEE_DOWNLOAD_RETRIES,
default 3).

A model published in several files (gguf-split's NAME-00001-of-0000N.gguf …) is fetched
file by file into `downloads/<id>.shards/`, each resumed and verified as a single file is
(size, GGUF header, the Hub's sha256), under one progress bar; only when every file is
there and they check out as one model (rbee_common.ggufmeta.read_model_files) are they
registered, together, as one entry. A file that fails registers nothing and leaves the
others' bytes for the next run.

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
from rbee_common.ggufmeta import NotAGguf, read_gguf_file, read_model_files
from rbee_common.models import (
    FileSource,
    HfSource,
    ModelSpec,
    ShardMissing,
    UrlSource,
    check_id,
    shards,
)
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
from rbee_hive.store import (
    HASH_CHUNK,
    ModelStore,
    Piece,
    downloads_dir,
    link_or_copy,
    missing_files,
    sha256_file,
)

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
    """Make `spec` present on this host (every file of a split model); return its record
    plus what this run transferred."""
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
    if record and record["source"] == str(spec.source) and not missing_files(record):
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


@dataclass(frozen=True)
class File:
    """One file of the model being fetched, and where its partial bytes wait between runs."""

    no: int  # 1-based
    count: int
    source: HfSource | UrlSource
    part: Path
    meta: Path  # what the partial bytes are of: a changed remote file starts over

    @property
    def name(self) -> str:
        return self.source.filename


def _files(spec: ModelSpec) -> list[File]:
    """The model's files: downloads/<id>.part for one file, downloads/<id>.shards/ for several."""
    dl = downloads_dir()
    sources = shards(spec.source)
    n = len(sources)
    if n == 1:
        assert isinstance(spec.source, HfSource | UrlSource)
        return [File(1, 1, spec.source, dl / f"{spec.id}.part", dl / f"{spec.id}.json")]
    folder = dl / f"{spec.id}.shards"
    files = []
    for no, src in enumerate(sources, 1):
        assert isinstance(src, HfSource | UrlSource)
        stem = folder / f"{no:05d}-of-{n:05d}"
        files.append(File(no, n, src, stem.with_suffix(".part"), stem.with_suffix(".json")))
    return files


@dataclass(frozen=True)
class Got:
    """One file, verified: where its bytes are and what this run did for it."""

    file: File
    path: Path  # its .part, or the Hugging Face cache's blob (then `cached`)
    sha256: str
    size: int
    cached: bool = False
    transferred: int = 0
    resumed_from: int = 0
    remote: Remote | None = None


def _fetch_locked(spec: ModelSpec, store: ModelStore, report: Reporter,
                  retries: int) -> dict[str, Any]:
    files = _files(spec)
    started = time.monotonic()
    hf = isinstance(spec.source, HfSource)
    if hf and hfcache.offline():
        return _register(spec, store, [_from_hf_cache(spec, f, None, report) for f in files],
                         report, started)
    with _client() as client:
        try:
            remotes = [_resolve_file(spec, f, client) for f in files]
        except HubUnreachable:
            if not hf or any(hfcache.cached_file(f.source) is None for f in files):
                raise
            # the Hub is out of reach: the cached files of this revision serve, as in `hf`
            report({"event": "log", "message": "The Hub is out of reach; using the Hugging "
                                               "Face cache."})
            return _register(spec, store, [_from_hf_cache(spec, f, None, report)
                                           for f in files], report, started)
        got: dict[int, Got] = {}
        for f, remote in zip(files, remotes, strict=True):
            if hf and remote.etag and hfcache.blob_for(f.source, remote.etag) is not None:
                try:
                    got[f.no] = _from_hf_cache(spec, f, remote, report)
                except (NotAGguf, ChecksumMismatch) as e:
                    # a damaged cache entry: fetch the file afresh rather than trust it
                    log.warning("the Hugging Face cache's copy of %s does not verify (%s); "
                                "downloading it", f.source, e)
        todo = [(f, r) for f, r in zip(files, remotes, strict=True) if f.no not in got]
        if todo:
            sizes = [r.size for _, r in todo]
            total = None if None in sizes else sum(s for s in sizes if s is not None)
            if len(files) == 1:
                total = remotes[0].size or spec.size
            bar = _Bar(report, f"Downloading {spec.id}" + (
                f" ({len(todo)} files)" if len(files) > 1 else ""), total, len(todo))
            for f, remote in todo:
                got[f.no] = _download(spec, f, remote, client, bar, retries)
            bar.done()
    return _register(spec, store, [got[f.no] for f in files], report, started)


def _download(spec: ModelSpec, f: File, remote: Remote, client: httpx.Client, bar: _Bar,
              retries: int) -> Got:
    """Transfer one file into its .part (resuming what earlier runs left), and verify it."""
    meta = {"source": str(f.source), "validator": remote.validator, "size": remote.size}
    previous = read_json(f.meta)
    if f.part.exists() and previous != meta:
        # the remote file is not the one the partial bytes came from: start over
        f.part.unlink()
    with disk_full_as(f.meta, None):
        f.meta.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(f.meta, meta)
    expected = remote.size or (spec.size if f.count == 1 else None)
    try:
        done = _transfer(spec, f, remote, expected, client, bar, retries)
    except KeyboardInterrupt:
        kept = f.part.stat().st_size if f.part.exists() else 0
        raise Interrupted(f"download of {spec.id} interrupted; {kept} bytes"
                          f"{' of ' + f.name if f.count > 1 else ''} kept",
                          hint="Run the same command again to resume.") from None
    try:
        _verify(spec, f, remote, f.part, done.size, done.sha256)
    except (NotAGguf, ChecksumMismatch):
        # a wrong file must not be resumed into: drop it so the next run starts clean
        f.part.unlink(missing_ok=True)
        f.meta.unlink(missing_ok=True)
        raise
    return Got(f, f.part, done.sha256, done.size, transferred=done.transferred,
               resumed_from=done.resumed_from, remote=remote)


def _register(spec: ModelSpec, store: ModelStore, got: list[Got], report: Reporter,
              started: float) -> dict[str, Any]:
    """Check the files are one model, then put them in the store as one entry."""
    info = read_model_files([g.path for g in got], [g.file.name for g in got])
    total = sum(g.size for g in got)
    if len(got) > 1 and spec.size is not None and total != spec.size:
        raise ChecksumMismatch(f"{spec.id}: its {len(got)} files hold {total} bytes, expected "
                               f"{spec.size}", expected_size=spec.size, actual_size=total)
    for g in got:
        if isinstance(g.file.source, HfSource) and g.remote is not None and g.remote.etag \
                and g.remote.revision and not g.cached:
            hfcache.share(g.file.source, g.path, g.remote.etag, g.remote.revision)
    staged: list[Path] = []
    try:
        pieces = []
        for g in got:
            tmp = g.path
            if g.cached:  # the cache keeps its blob: the store gets a link to it
                tmp = store.dir / f".{spec.id}.{g.file.no}.hfcache.tmp"
                store.dir.mkdir(parents=True, exist_ok=True)
                tmp.unlink(missing_ok=True)
                staged.append(tmp)
                link_or_copy(g.path, tmp, report)
            pieces.append(Piece(tmp, g.sha256, g.size))
        record = store.finish(spec, pieces, info, _revision(got))
    finally:
        for tmp in staged:
            tmp.unlink(missing_ok=True)
    for g in got:  # a partial download of a file the cache served is no longer needed
        g.file.part.unlink(missing_ok=True)
        g.file.meta.unlink(missing_ok=True)
    if got[0].file.count > 1:
        with contextlib.suppress(OSError):
            got[0].file.part.parent.rmdir()
    return {**record, "transferred_bytes": sum(g.transferred for g in got),
            "resumed_from": sum(g.resumed_from for g in got), "already_present": False,
            "elapsed_s": round(time.monotonic() - started, 3)}


def _revision(got: list[Got]) -> str | None:
    """The commit the files came from (the Hub's, or the one the cache filed them under)."""
    for g in got:
        if g.remote is not None and g.remote.revision:
            return g.remote.revision
    return None


def _from_hf_cache(spec: ModelSpec, f: File, remote: Remote | None, report: Reporter) -> Got:
    """The file the Hugging Face cache holds, verified (it is linked into the store later).

    With `remote` (online) the blob is the one the Hub names now; without (offline, or the
    Hub out of reach) it is the one the revision's ref names in the cache.
    """
    src = f.source
    assert isinstance(src, HfSource)
    if remote is not None:
        assert remote.etag is not None
        blob, vouched = hfcache.blob_for(src, remote.etag), remote.sha256
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
        remote = Remote(url="", headers={}, size=None, sha256=vouched, validator=None,
                        revision=commit)
    assert blob is not None
    digest = sha256_file(blob, report, message=f"Verifying {src.path} from the Hugging Face "
                                               "cache")
    _verify(spec, f, replace(remote, sha256=vouched), blob, blob.stat().st_size, digest)
    report({"event": "log", "message": f"Took {src.path} from the Hugging Face cache ({blob})"})
    return Got(f, blob, digest, blob.stat().st_size, cached=True, remote=remote)


def _resolve_file(spec: ModelSpec, f: File, client: httpx.Client) -> Remote:
    """Where one file is; a later file of a split model that is not there is SHARD_MISSING."""
    try:
        return _resolve(f.source, client)
    except ModelNotFound as e:
        if f.no == 1:
            raise
        raise ShardMissing(f"{f.name}, file {f.no} of the {f.count} files of {spec.id}, is "
                           f"missing at its source: {e.message}", missing=[f.name],
                           count=f.count) from e


def _resolve(source: HfSource | UrlSource, client: httpx.Client) -> Remote:
    if isinstance(source, HfSource):
        return _resolve_hf(source)
    return _resolve_url(source, client)


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


class _Bar:
    """One progress bar over the transfers of all the files of a model."""

    phase = "download"

    def __init__(self, report: Reporter, message: str, total: int | None, files: int) -> None:
        self.report, self.message, self.total, self.files = report, message, total, files
        self.base = 0  # bytes of the files transferred before the current one
        self.started = False

    def begin(self, f: File, offset: int) -> None:
        if not self.started:
            self.started = True
            self.report({"event": "phase", "phase": self.phase, "message": self.message,
                         "total": self.total, "completed": self.base + offset,
                         "unit": "bytes"})
        if f.count > 1:
            self.report({"event": "progress", "phase": self.phase, "completed":
                         self.base + offset, "message": f"{self.message}: {f.name}"})

    def sized(self, total: int, offset: int) -> None:
        """The one file's size, learnt from the transfer itself (the server did not say)."""
        if self.total is None and self.files == 1:
            self.total = total
            self.report({"event": "progress", "phase": self.phase, "total": total,
                         "completed": offset})

    def at(self, offset: int) -> None:
        self.report({"event": "progress", "phase": self.phase, "completed": self.base + offset})

    def end_file(self, size: int) -> None:
        self.base += size

    def done(self) -> None:
        self.report({"event": "done", "phase": self.phase})


def _transfer(spec: ModelSpec, f: File, remote: Remote, expected: int | None,
              client: httpx.Client, bar: _Bar, retries: int) -> Transfer:
    """Append the missing bytes to the file's .part; return what the whole file and this run
    came to."""
    import httpx

    part = f.part
    hasher = _hash_prefix(part)
    offset = part.stat().st_size if part.exists() else 0
    resumed_from, received = offset, 0
    total = expected
    what = f.name if f.count > 1 else spec.id
    bar.begin(f, offset)
    if offset:
        bar.report({"event": "log", "message": f"Resuming {what} from byte {offset}"})

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
                    raise ModelNotFound(f"{f.source} does not exist (HTTP 404)")
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
                    bar.sized(total, offset)
                try:
                    with open(part, "ab") as out:
                        for chunk in r.iter_raw():
                            out.write(chunk)
                            hasher.update(chunk)
                            offset += len(chunk)
                            received += len(chunk)
                            bar.at(offset)
                        out.flush()
                        os.fsync(out.fileno())
                except OSError as e:
                    if not is_disk_full(e):
                        raise
                    # what reached the disk is a prefix of the file: the next run resumes it
                    kept = part.stat().st_size if part.exists() else 0
                    err = disk_full(part, total - kept if total is not None else None, e)
                    raise DiskFull(f"{err.message}; {kept} bytes of {what} kept",
                                   **{**err.details, "kept_bytes": kept}) from e
                if total is None:
                    total = offset
        except httpx.TransportError as e:
            attempt += 1
            if attempt > retries:
                raise DownloadFailed(
                    f"download of {what} failed after {retries} retries: {e or type(e).__name__}"
                    f" ({offset} of {total or '?'} bytes kept)", kept_bytes=offset) from e
            bar.report({"event": "log", "message": f"Connection lost at byte {offset} of "
                                                   f"{what} ({e}); resuming, attempt "
                                                   f"{attempt}/{retries}"})
            time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
    bar.end_file(offset)
    return Transfer(hasher.hexdigest(), offset, resumed_from, received)


def _range_start(content_range: str) -> int | None:
    m = re.match(r"bytes (\d+)-", content_range)
    return int(m.group(1)) if m else None


def _redact(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _verify(spec: ModelSpec, f: File, remote: Remote, path: Path, size: int,
            digest: str) -> None:
    """One file's size, GGUF header and sha256 (the catalog's is the first file's)."""
    what = spec.id if f.count == 1 else f"{spec.id}: {f.name}"
    expected_size = (spec.size if f.count == 1 else None) or remote.size
    if expected_size is not None and size != expected_size:
        raise ChecksumMismatch(f"{what}: got {size} bytes, expected {expected_size}",
                               expected_size=expected_size, actual_size=size)
    read_gguf_file(path)
    vouchers = [(spec.sha256 if f.no == 1 else None, "the catalog"),
                (remote.sha256, "the server")]
    for expected, who in vouchers:
        if expected and expected != digest:
            raise ChecksumMismatch(
                f"{what}: sha256 {digest[:16]}… does not match {who} ({expected[:16]}…); "
                "the file was discarded", expected=expected, actual=digest)


def with_id(spec: ModelSpec, model_id: str | None) -> ModelSpec:
    """`spec` stored under `model_id` (checked against the id rule) when one is given."""
    return replace(spec, id=check_id(model_id)) if model_id else spec
