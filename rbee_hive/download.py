"""Fetch a model into the store: resumable across runs, verified before it is registered.

    hf:    huggingface_hub resolves the file (commit, size, the Hub's sha256, CDN location);
    https: a HEAD request does;
then one loop transfers `downloads/<id>.part` with HTTP Range + If-Range, so a download
cut by Ctrl+C, a killed process or a dropped connection continues from the bytes on disk.
A dropped connection is also retried within the run (RBEE_DOWNLOAD_RETRIES, default 3).
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
from rbee_hive.errors import ChecksumMismatch, DownloadFailed
from rbee_hive.store import HASH_CHUNK, ModelStore, downloads_dir

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
    dl.mkdir(parents=True, exist_ok=True)
    with _download_lock(dl / f"{spec.id}.lock", spec.id, report):
        present = _present(spec, store)  # another process may have finished it meanwhile
        if present is not None:
            return present
        return _fetch_locked(spec, store, report, default_retries() if retries is None
                             else retries)


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
    with _client() as client:
        remote = _resolve(spec, client)
        meta = {"source": str(spec.source), "validator": remote.validator, "size": remote.size}
        previous = read_json(meta_path)
        if part.exists() and previous != meta:
            # the remote file is not the one the partial bytes came from: start over
            part.unlink()
        atomic_write_json(meta_path, meta)
        resumed_from = part.stat().st_size if part.exists() else 0
        try:
            digest, size = _transfer(spec, remote, part, client, report, retries)
        except KeyboardInterrupt:
            kept = part.stat().st_size if part.exists() else 0
            raise Interrupted(f"download of {spec.id} interrupted; {kept} bytes kept",
                              hint="Run the same command again to resume.") from None
    try:
        info = _verify(spec, remote, part, size, digest)
    except (NotAGguf, ChecksumMismatch):
        # a wrong file must not be resumed into: drop it so the next run starts clean
        part.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
        raise
    record = store.finish(spec, part, digest, info, remote.revision)
    meta_path.unlink(missing_ok=True)
    elapsed = time.monotonic() - started
    return {**record, "transferred_bytes": size - resumed_from, "resumed_from": resumed_from,
            "already_present": False, "elapsed_s": round(elapsed, 3)}


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
        raise DownloadFailed(f"the Hub refused {src}: {_first_line(e)}") from e
    except Exception as e:  # connection errors of huggingface_hub's HTTP client
        raise DownloadFailed(f"cannot reach the Hub for {src}: {type(e).__name__}: "
                             f"{_first_line(e)}",
                             hint="Check the network (and HF_ENDPOINT if you set one).") from e
    headers = build_hf_headers()
    location = meta.location
    if urlsplit(location).netloc != urlsplit(url).netloc:
        headers.pop("authorization", None)  # never hand the Hub token to a CDN
    etag = meta.etag if meta.etag and _SHA256.match(meta.etag) else None
    return Remote(url=location, headers=dict(headers), size=meta.size, sha256=etag,
                  validator=f'"{meta.etag}"' if meta.etag else None,
                  revision=meta.commit_hash)


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
              report: Reporter, retries: int) -> tuple[str, int]:
    """Append the missing bytes to `part`; return (sha256, size) of the whole file."""
    import httpx

    hasher = _hash_prefix(part)
    offset = part.stat().st_size if part.exists() else 0
    total = remote.size or spec.size
    phase = "download"
    report({"event": "phase", "phase": phase, "message": f"Downloading {spec.id}",
            "total": total, "completed": offset, "unit": "bytes"})
    if offset:
        report({"event": "log", "message": f"Resuming {spec.id} from byte {offset}"})
    attempt = 0
    while True:
        if total is not None and offset == total:
            break
        if total is not None and offset > total:
            part.unlink()
            hasher, offset = hashlib.sha256(), 0
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
                    part.unlink()  # our bytes no longer describe the remote file
                    hasher, offset = hashlib.sha256(), 0
                    continue
                if r.status_code == 200 and offset:
                    # the server sent the whole file (changed, or no Range support)
                    part.unlink()
                    hasher, offset = hashlib.sha256(), 0
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
                with open(part, "ab") as f:
                    for chunk in r.iter_raw():
                        f.write(chunk)
                        hasher.update(chunk)
                        offset += len(chunk)
                        report({"event": "progress", "phase": phase, "completed": offset})
                    f.flush()
                    os.fsync(f.fileno())
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
    return hasher.hexdigest(), offset


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
