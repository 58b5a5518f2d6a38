"""A llama-architecture GGUF that real llama.cpp loads: written by tests and benchmarks.

`write_tiny_model` writes the tests' tiny model (about 430 KB); `write_model` writes any
`Shape`, e.g. `REALISTIC` (TinyLlama 1.1B's layers, F16, about 1.9 GB) for bench/gpu.py;
`write_split_tiny_model` writes the same tiny model split into several files as llama.cpp's
gguf-split does (NAME-00001-of-0000N.gguf …, with split.no / split.count /
split.tensors.count in each file, the model's metadata in the first).
Weights are random and small, except for a planted next-token table: every token's
embedding is a one-hot "slot" and the output matrix maps each slot to its successor, so
generation is predictable whatever the sampling settings:

- after any ordinary text the model spells the cycle "abcdefghijklmnopqrstuvwxyz " forever;
- after "!" it writes "KO" and then end-of-sequence;
- after "#" it writes the terminal escape sequence ESC "[2J" (clear screen), then
  end-of-sequence: what a hostile model could print.

That lets tests assert exact text, stop sequences, EOS and long streams (for cancelling).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

CYCLE = "abcdefghijklmnopqrstuvwxyz "
UNK, BOS, EOS = 0, 1, 2
BYTE0 = 3  # token id of <0x00>


def byte_token(ch: str) -> int:
    return BYTE0 + ord(ch)


def successors() -> dict[int, int]:
    """The planted table: token → the token the model produces next."""
    nxt: dict[int, int] = {BOS: byte_token("a")}
    for a, b in zip(CYCLE, CYCLE[1:] + CYCLE[0], strict=True):
        nxt[byte_token(a)] = byte_token(b)
    nxt[byte_token("!")] = byte_token("K")
    nxt[byte_token("K")] = byte_token("O")
    nxt[byte_token("O")] = EOS
    for a, b in zip("#\x1b[2", "\x1b[2J", strict=True):
        nxt[byte_token(a)] = byte_token(b)
    nxt[byte_token("J")] = EOS
    return nxt


@dataclass(frozen=True)
class Shape:
    """A model's dimensions, the spread of its random layer weights and their storage type."""

    n_embd: int = 64
    n_layers: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    layer_std: float = 0.02  # small enough that the planted table survives every layer
    dtype: str = "F32"  # "F32" or "F16": the matrices (norms stay F32)


TINY = Shape()
# TinyLlama 1.1B's layers with this vocabulary: 969 M parameters, 1.9 GB in F16
REALISTIC = Shape(n_embd=2048, n_layers=22, n_head=32, n_head_kv=4, n_ff=5632,
                  layer_std=0.001, dtype="F16")


def write_tiny_model(path: Path, context_length: int = 32768, seed: int = 0,
                     chat_template: str | None = None, quant: str | None = None,
                     n_layers: int = TINY.n_layers, name: str = "rbee-tiny-test") -> Path:
    """Write the tests' tiny model; `quant` ("Q8_0", "Q4_0", …) quantises the layers'
    matrices, which sends llama.cpp down its quantised kernels (where CPU bugs live);
    `n_layers` makes it as deep as a real model (llama.cpp's load log grows with it)."""
    return write_model(path, replace(TINY, n_layers=n_layers), context_length=context_length,
                       seed=seed, chat_template=chat_template, quant=quant, name=name)


def write_split_tiny_model(path: Path, files: int = 3, *, seed: int = 0,
                           n_layers: int = TINY.n_layers, quant: str | None = None,
                           name: str = "rbee-tiny-test") -> list[Path]:
    """The tiny model (the same weights as `write_tiny_model` with the same arguments) in
    `files` files named after `path`: tiny.gguf → tiny-00001-of-00003.gguf …"""
    n_tensors = 3 + 9 * n_layers
    write_model(path, replace(TINY, n_layers=n_layers), seed=seed, quant=quant, name=name,
                split_max_tensors=-(-n_tensors // files))
    paths = [path.with_name(f"{path.stem}-{no:05d}-of-{files:05d}.gguf")
             for no in range(1, files + 1)]
    missing = [p for p in paths if not p.is_file()]
    assert not missing, f"gguf wrote other files than {missing}"
    return paths


def write_model(path: Path, shape: Shape, *, context_length: int = 32768, seed: int = 0,
                chat_template: str | None = None, quant: str | None = None,
                name: str = "rbee-tiny-test", split_max_tensors: int = 0) -> Path:
    """Write a model of `shape` with the planted next-token table (see the module doc);
    `split_max_tensors` splits it into files of at most that many tensors (gguf-split's
    names and keys), and then `path` only names them."""
    import gguf

    rng = np.random.default_rng(seed)
    n_vocab = BYTE0 + 256
    n_embd, n_layers, n_head, n_head_kv, n_ff = (
        shape.n_embd, shape.n_layers, shape.n_head, shape.n_head_kv, shape.n_ff)
    hd = n_embd // n_head
    fdtype = {"F32": np.float32, "F16": np.float16}[shape.dtype]
    table = successors()
    slots = {tok: i for i, tok in enumerate(sorted(table))}  # one embedding slot each
    default_slot = len(slots)  # every other token shares one, and is followed by "a"

    embd = np.zeros((n_vocab, n_embd), dtype=np.float32)
    for tok in range(n_vocab):
        embd[tok, slots.get(tok, default_slot)] = np.sqrt(n_embd)
    out = np.zeros((n_vocab, n_embd), dtype=np.float32)
    for tok, slot in slots.items():
        out[table[tok], slot] = 4.0
    out[byte_token("a"), default_slot] = 4.0

    def small(*dims: int) -> np.ndarray:
        return (rng.standard_normal(dims) * shape.layer_std).astype(np.float32)

    def matrix(tensor: str, *dims: int) -> None:
        data = small(*dims)
        if qtype is None:
            w.add_tensor(tensor, data.astype(fdtype))
        else:
            w.add_tensor(tensor, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    w = gguf.GGUFWriter(str(path), "llama", split_max_tensors=split_max_tensors)
    w.add_name(name)
    w.add_context_length(context_length)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    qtype = getattr(gguf.GGMLQuantizationType, quant) if quant else None
    w.add_file_type({None: 0 if shape.dtype == "F32" else 1, "Q8_0": 7, "Q4_0": 2,
                     "Q4_1": 3}[quant])
    w.add_tokenizer_model("llama")
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types([2, 3, 3] + [6] * 256)
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_unk_token_id(UNK)
    if chat_template:
        w.add_chat_template(chat_template)
    w.add_tensor("token_embd.weight", embd.astype(fdtype))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("output.weight", out.astype(fdtype))
    for i in range(n_layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        matrix(f"blk.{i}.attn_q.weight", n_head * hd, n_embd)
        matrix(f"blk.{i}.attn_k.weight", n_head_kv * hd, n_embd)
        matrix(f"blk.{i}.attn_v.weight", n_head_kv * hd, n_embd)
        matrix(f"blk.{i}.attn_output.weight", n_embd, n_head * hd)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        matrix(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        matrix(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        matrix(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


if __name__ == "__main__":
    import sys

    print(write_tiny_model(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny.gguf")))
