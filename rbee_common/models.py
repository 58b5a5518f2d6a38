"""Model references (hf:, file:, https:) parsed by pattern, and what a reference resolves to.

A reference is parsed by pattern, never by a shell: anything that is not one of the four
forms is INVALID_MODEL_REF before any file is touched or any command runs.

A model published in several files (llama.cpp's gguf-split names them
`NAME-00001-of-00003.gguf` …) is named by any one of them and means all of them: the
reference is kept as its first file's, which is the file llama.cpp loads (it finds the rest
by name), and `shards()` lists every file's source.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, replace
from typing import Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from rbee_common.errors import InvalidModelRef, ModelNotFound, UsageError

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,199}"
HF_RE = re.compile(
    rf"^hf:(?P<repo>{_NAME}/{_NAME})(?:@(?P<rev>[A-Za-z0-9][A-Za-z0-9._-]{{0,63}}))?"
    rf"/(?P<path>(?:{_SEGMENT}/)*{_SEGMENT}\.gguf)$"
)
ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
ID_RULE = "1 to 64 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# llama.cpp's llama_split_path: "%s-%05d-of-%05d.gguf", numbered from 1
SPLIT_RE = re.compile(r"^(?P<prefix>.+)-(?P<no>[0-9]{5})-of-(?P<count>[0-9]{5})\.gguf$")


class ShardMissing(ModelNotFound):
    """A file of a model published in several files is not where the others are."""

    code = "SHARD_MISSING"
    default_hint = ("A split model needs every file gguf-split wrote (NAME-00001-of-0000N.gguf "
                    "…), side by side under those names: fetch the missing one, or all again.")


@dataclass(frozen=True)
class Split:
    """Where a file named by gguf-split's pattern sits in its model: file `no` of `count`."""

    prefix: str
    no: int  # 1-based, as in the name
    count: int

    def name(self, no: int) -> str:
        """The file name of file `no` (1-based) of the same model."""
        return f"{self.prefix}-{no:05d}-of-{self.count:05d}.gguf"


def split_of(filename: str) -> Split | None:
    """The split a file name announces (None for a name without the pattern)."""
    m = SPLIT_RE.match(filename)
    if m is None:
        return None
    return Split(m["prefix"], int(m["no"]), int(m["count"]))


@dataclass(frozen=True)
class HfSource:
    repo: str
    revision: str
    path: str
    kind: Literal["hf"] = "hf"

    def __str__(self) -> str:
        rev = "" if self.revision == "main" else f"@{self.revision}"
        return f"hf:{self.repo}{rev}/{self.path}"

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def sibling(self, name: str) -> HfSource:
        """The file `name` in the same folder of the same repository and revision."""
        head = self.path.rpartition("/")[0]
        return replace(self, path=f"{head}/{name}" if head else name)


@dataclass(frozen=True)
class UrlSource:
    url: str
    kind: Literal["url"] = "url"

    def __str__(self) -> str:
        return self.url

    @property
    def filename(self) -> str:
        return unquote(urlsplit(self.url).path.rsplit("/", 1)[-1])

    def sibling(self, name: str) -> UrlSource:
        """The file `name` beside this one on the same server (same query string)."""
        parts = urlsplit(self.url)
        head = parts.path.rpartition("/")[0]
        return replace(self, url=urlunsplit(parts._replace(path=f"{head}/{quote(name)}")))


@dataclass(frozen=True)
class FileSource:
    path: str
    kind: Literal["file"] = "file"

    def __str__(self) -> str:
        return f"file:{self.path}"

    @property
    def filename(self) -> str:
        return os.path.basename(self.path)

    def sibling(self, name: str) -> FileSource:
        """The file `name` in the same directory."""
        return replace(self, path=os.path.join(os.path.dirname(self.path), name))


Source = HfSource | UrlSource | FileSource


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_source(ref: str) -> Source:
    """Parse an hf:, file: or https: reference; raise INVALID_MODEL_REF for anything else.

    A reference to any file of a model in several files (gguf-split's names) comes back as
    the reference to its first file.
    """
    return _first_file(_parse(ref), ref)


def _first_file(source: Source, ref: str) -> Source:
    split = split_of(source.filename)
    if split is None:
        return source
    if not 1 <= split.no <= split.count:
        raise InvalidModelRef(
            f"{ref!r} names file {split.no} of {split.count}: there is no such file",
            hint=f"Name the model by its first file, {split.name(1)}.")
    return source.sibling(split.name(1)) if split.no != 1 else source


def shards(source: Source) -> list[Source]:
    """Every file of the model `source` names, first to last (one for a single file)."""
    split = split_of(source.filename)
    if split is None or split.count == 1:
        return [source]
    return [source if no == split.no else source.sibling(split.name(no))
            for no in range(1, split.count + 1)]


def _parse(ref: str) -> Source:
    if _CONTROL.search(ref):
        raise InvalidModelRef(f"model reference {ref!r} contains control characters")
    if ref.startswith("hf:"):
        m = HF_RE.match(ref)
        if not m or ".." in ref:
            raise InvalidModelRef(
                f"{ref!r} is not a valid hf: reference",
                hint="Write it as hf:ORG/REPO[@REVISION]/PATH/FILE.gguf, e.g. "
                "hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf",
            )
        return HfSource(m["repo"], m["rev"] or "main", m["path"])
    if ref.startswith("file:"):
        path = ref[len("file:"):]
        if path.startswith("//"):  # file:///abs/path
            path = path[2:]
        if not os.path.isabs(path):
            raise InvalidModelRef(f"{ref!r}: a file: reference needs an absolute path",
                                  hint="Write file:/absolute/path/model.gguf.")
        return FileSource(os.path.normpath(path))
    if ref.startswith(("https://", "http://")):
        parts = urlsplit(ref)
        host = parts.hostname or ""
        if parts.scheme == "http" and not _is_loopback(host):
            raise InvalidModelRef(f"{ref!r}: plain http is only accepted on loopback",
                                  hint="Use an https:// address.")
        if parts.username or parts.password:
            raise InvalidModelRef("a model URL must not carry credentials",
                                  hint="Remove user:password@ from the address.")
        if not host or " " in ref or not unquote(parts.path).endswith(".gguf"):
            raise InvalidModelRef(f"{ref!r} is not an address of a .gguf file")
        if ".." in unquote(parts.path).split("/"):
            raise InvalidModelRef(f"{ref!r}: '..' is not allowed in a model address")
        return UrlSource(ref)
    raise InvalidModelRef(f"{ref!r} is not a model reference")


def check_id(model_id: str) -> str:
    """`model_id` if it follows ID_RE; a USAGE error naming the rule if not.

    An id becomes a file name (models/<id>.gguf, downloads/<id>.part): this is what keeps an
    id given on the command line (or over HTTP) from writing anywhere else.
    """
    if not ID_RE.fullmatch(model_id):  # fullmatch: `$` alone would let a trailing newline in
        raise UsageError(f"{model_id!r} is not a valid model id: an id is {ID_RULE}",
                         hint="Choose another --id, e.g. --id my-model-q4.",
                         pattern=ID_RE.pattern)
    return model_id


def derive_id(source: Source) -> str:
    """A registry id for a source that is not in the catalog: its file name, made safe."""
    split = split_of(source.filename)
    stem = split.prefix if split is not None else source.filename
    if stem.lower().endswith(".gguf"):
        stem = stem[: -len(".gguf")]
    slug = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._") or "model"
    return slug[:64]


@dataclass(frozen=True)
class ModelSpec:
    """What a reference resolves to: the id it is stored under and where to get it."""

    id: str
    name: str
    source: Source
    sha256: str | None = None
    size: int | None = None
