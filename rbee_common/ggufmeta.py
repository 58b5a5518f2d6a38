"""Read a GGUF file's header and metadata without numpy: fast, and safe on hostile input.

Only the key/value section and the tensor table are read; tensor data is never touched.
The result is what `models info` prints and what placement's memory estimate needs.

A model in several files (gguf-split) is read file by file: `read_model_files` checks that
the files are one model, in order (llama.cpp's loader rules: `split.no`, `split.count`,
`split.tensors.count`, no tensor twice) and sums what they hold, taking the model's facts
(architecture, layers, context, KV shape) from the first file, the one that carries them.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

from rbee_common.errors import RbeeError

GGUF_MAGIC = b"GGUF"
_MAX_STRING = 64 * 1024 * 1024  # longer than any real chat template; stops hostile lengths
_MAX_ARRAY = 16 * 1024 * 1024
_MAX_DIMS = 8

# llama_ftype (general.file_type) → the name people use
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4",
}

# value type → struct format for scalars
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class NotAGguf(RbeeError):
    """The file is not a GGUF model (wrong magic, truncated or malformed header)."""

    code = "NOT_A_GGUF"
    default_hint = ("rbee runs GGUF files (llama.cpp's format); look for a repository ending "
                    "in -GGUF.")


class ShardMismatch(RbeeError):
    """The files of a split model are not one model's files, in order, under their names."""

    code = "SHARD_MISMATCH"
    default_hint = ("A split model is the files gguf-split wrote for it, under the names it "
                    "gave them (NAME-00001-of-0000N.gguf …): fetch all of them again from one "
                    "source and revision, and do not rename them.")


@dataclass(frozen=True)
class GgufInfo:
    """What a GGUF header says about a model."""

    version: int
    architecture: str | None
    name: str | None
    file_type: str | None
    parameters: int
    tensor_count: int
    block_count: int | None
    context_length: int | None
    embedding_length: int | None
    head_count: int | None
    head_count_kv: int | None
    kv_per_token: int | None  # sum over layers of kv_heads * (key_len + value_len), elements
    vocab_size: int | None
    has_chat_template: bool
    data_offset: int  # bytes before the tensor data (a split model: summed over its files)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Header:
    """One GGUF file's header: what it says about the model, and where it sits in a split."""

    info: GgufInfo
    tensor_names: tuple[str, ...]
    split_no: int | None  # split.no: 0 for the first file of a split model
    split_count: int | None  # split.count
    split_tensors: int | None  # split.tensors.count: tensors in all the files together


class _Reader:
    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.pos = 0

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise NotAGguf("the file ends inside its GGUF header (truncated?)")
        self.pos += n
        return b

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > _MAX_STRING:
            raise NotAGguf(f"a GGUF string claims {n} bytes: the header is corrupt")
        return self.read(n).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.unpack("<Q")
        if n > _MAX_STRING:
            raise NotAGguf(f"a GGUF string claims {n} bytes: the header is corrupt")
        self.read(n)

    def value(self, vtype: int, keep: bool) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            if keep:
                return self.string()
            self.skip_string()
            return None
        if vtype == _ARRAY:
            itype = self.unpack("<I")
            n = self.unpack("<Q")
            if n > _MAX_ARRAY:
                raise NotAGguf(f"a GGUF array claims {n} items: the header is corrupt")
            if itype in _SCALARS:
                size = struct.calcsize(_SCALARS[itype])
                raw = self.read(size * n)
                if keep:
                    return list(struct.unpack(f"<{n}{_SCALARS[itype][1]}", raw))
                return n
            if itype == _STRING:
                for _ in range(n):
                    self.skip_string()
                return n
            raise NotAGguf(f"unsupported GGUF array item type {itype}")
        raise NotAGguf(f"unsupported GGUF value type {vtype}")


def read_gguf(f: BinaryIO) -> GgufInfo:
    """Parse a GGUF header from a binary stream positioned at its start."""
    return read_header(f).info


def read_header(f: BinaryIO) -> Header:
    """A GGUF header with its split keys and tensor names, from a stream at its start."""
    r = _Reader(f)
    magic = f.read(4)
    r.pos = len(magic)
    if magic != GGUF_MAGIC:
        raise NotAGguf(f"not a GGUF file (starts with {magic[:4]!r}, expected b'GGUF')")
    version = r.unpack("<I")
    if version not in (2, 3):
        raise NotAGguf(f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors = r.unpack("<Q")
    n_kv = r.unpack("<Q")
    if n_tensors > 1_000_000 or n_kv > 1_000_000:
        raise NotAGguf("the GGUF header counts are implausible: the file is corrupt")
    kv: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string()
        vtype = r.unpack("<I")
        # keep every scalar and short array; token lists are only counted
        keep = not key.startswith("tokenizer.ggml.") or key.endswith("_id")
        kv[key] = r.value(vtype, keep)
    params = 0
    names = []
    for _ in range(n_tensors):
        names.append(r.string())
        n_dims = r.unpack("<I")
        if n_dims > _MAX_DIMS:
            raise NotAGguf(f"a tensor claims {n_dims} dimensions: the file is corrupt")
        count = 1
        for _ in range(n_dims):
            count *= r.unpack("<Q")
        r.unpack("<I")  # ggml type
        r.unpack("<Q")  # offset
        params += count
    align = int(kv.get("general.alignment", 32) or 32)
    data_offset = (r.pos + align - 1) // align * align
    return Header(_info(version, kv, params, n_tensors, data_offset), tuple(names),
                  _int(kv.get("split.no")), _int(kv.get("split.count")),
                  _int(kv.get("split.tensors.count")))


_MAX_COUNT = 1 << 48  # above any real size, count or length a header holds
_MAX_LAYERS = 1 << 16  # real models have a few hundred; a count per layer is built from it


def _int(value: Any, most: int = _MAX_COUNT) -> int | None:
    """A count from the header: an integer from 0 to `most`, else None (not a bool, not a
    negative that would shrink an estimate, not a size that would exhaust memory)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= most
    return value if ok else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _per_layer(value: Any, layers: int | None) -> list[int] | None:
    """A per-layer count (a list, or one number for every layer); None when it is neither."""
    if isinstance(value, list):
        counts = [_int(v) for v in value]
        return None if any(c is None for c in counts) else [c for c in counts if c is not None]
    count = _int(value)
    return None if count is None else [count] * (layers or 0)


def _info(version: int, kv: dict[str, Any], params: int, n_tensors: int,
          data_offset: int) -> GgufInfo:
    """What the header says of the model. A key of another type than llama.cpp writes (a
    string where a number belongs, say) reads as absent: these values reach placement's
    arithmetic and the terminal."""
    arch = _str(kv.get("general.architecture"))
    a = f"{arch}." if arch else ""

    def get(key: str) -> int | None:
        return _int(kv.get(a + key))

    layers = _int(kv.get(a + "block_count"), _MAX_LAYERS)
    embd = get("embedding_length")
    heads_list = _per_layer(kv.get(a + "attention.head_count"), layers)
    kv_heads_list = _per_layer(kv.get(a + "attention.head_count_kv"), layers) or heads_list
    head_max = max(heads_list) if heads_list else _int(kv.get(a + "attention.head_count"))
    default_dim = embd // head_max if embd and head_max else None
    k_len = get("attention.key_length") or default_dim
    v_len = get("attention.value_length") or default_dim
    kv_per_token = None
    if kv_heads_list and k_len and v_len:
        kv_per_token = sum(h * (k_len + v_len) for h in kv_heads_list)
    vocab = kv.get("tokenizer.ggml.tokens")
    ftype = _int(kv.get("general.file_type"))
    return GgufInfo(
        version=version,
        architecture=arch,
        name=_str(kv.get("general.name")),
        file_type=FILE_TYPES.get(ftype, str(ftype)) if ftype is not None else None,
        parameters=params,
        tensor_count=n_tensors,
        block_count=layers,
        context_length=get("context_length"),
        embedding_length=embd,
        head_count=head_max,
        head_count_kv=max(kv_heads_list) if kv_heads_list else None,
        kv_per_token=kv_per_token,
        vocab_size=vocab if isinstance(vocab, int) else get("vocab_size"),
        has_chat_template=isinstance(kv.get("tokenizer.chat_template"), str),
        data_offset=data_offset,
    )


def read_gguf_file(path: Path) -> GgufInfo:
    return read_header_file(path).info


def read_header_file(path: Path) -> Header:
    try:
        with open(path, "rb", buffering=1 << 20) as f:
            return read_header(f)
    except IsADirectoryError as e:
        raise NotAGguf(f"{path} is a directory, not a GGUF file") from e


def read_model_files(paths: Sequence[Path], names: Sequence[str] | None = None) -> GgufInfo:
    """What the files of one model (one file, or a split model's files in order) hold.

    `names` are the files' published names (default: the paths' names), used in messages.
    SHARD_MISMATCH when the files are not one split model's files in this order, or when a
    single file is one file of a split model.
    """
    names = list(names) if names is not None else [p.name for p in paths]
    headers = [read_header_file(p) for p in paths]
    return check_split(headers, names)


def check_split(headers: Sequence[Header], names: Sequence[str]) -> GgufInfo:
    """The model `headers` (one per file, in order) make up; SHARD_MISMATCH if they do not."""
    n = len(headers)
    first = headers[0]
    if n == 1:
        if (first.split_count or 1) > 1:
            no = (first.split_no or 0) + 1
            raise ShardMismatch(
                f"{names[0]} is file {no} of {first.split_count} of a split model, but its "
                "name does not say so: llama.cpp finds the other files by name",
                file=names[0], split_no=no, split_count=first.split_count,
                hint="Keep the names gguf-split gave the files (NAME-00001-of-"
                     f"{first.split_count:05d}.gguf …) and name the model by its first file.")
        return first.info
    seen: dict[str, str] = {}
    for i, (h, name) in enumerate(zip(headers, names, strict=True)):
        if h.split_count is None or h.split_no is None:
            raise ShardMismatch(f"{name} is named as file {i + 1} of {n}, but it is a whole "
                                "model, not one file of a split model", file=name)
        if h.split_count != n:
            raise ShardMismatch(f"{name} is named as file {i + 1} of {n}, but its header says "
                                f"the model is in {h.split_count} files", file=name,
                                expected_count=n, actual_count=h.split_count)
        if h.split_no != i:
            raise ShardMismatch(f"{name} is named as file {i + 1} of {n}, but its header says "
                                f"it is file {h.split_no + 1}", file=name,
                                expected_no=i + 1, actual_no=h.split_no + 1)
        if h.split_tensors != first.split_tensors:
            raise ShardMismatch(
                f"{name} belongs to another model: its header counts {h.split_tensors} "
                f"tensors in the whole model, {names[0]} counts {first.split_tensors}",
                file=name)
        for tensor in h.tensor_names:
            if tensor in seen:
                raise ShardMismatch(f"{name} belongs to another model: tensor {tensor!r} is "
                                    f"also in {seen[tensor]}", file=name, tensor=tensor)
            seen[tensor] = name
    if first.split_tensors != len(seen):
        raise ShardMismatch(f"the {n} files hold {len(seen)} tensors, but the model has "
                            f"{first.split_tensors}: a file of another model is among them",
                            expected_tensors=first.split_tensors, actual_tensors=len(seen))
    if first.info.architecture is None:
        raise ShardMismatch(f"{names[0]} does not describe the model (no "
                            "general.architecture): it is not the first file of a split model",
                            file=names[0])
    return replace(first.info,
                   parameters=sum(h.info.parameters for h in headers),
                   tensor_count=len(seen),
                   data_offset=sum(h.info.data_offset for h in headers))
