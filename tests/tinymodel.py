"""A tiny llama-architecture GGUF that real llama.cpp loads: written by tests and benchmarks.

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

from pathlib import Path

import numpy as np

CYCLE = "abcdefghijklmnopqrstuvwxyz "
N_EMBD, N_LAYERS, N_HEAD, N_HEAD_KV, N_FF = 64, 2, 4, 2, 128
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


def write_tiny_model(path: Path, context_length: int = 32768, seed: int = 0,
                     chat_template: str | None = None, quant: str | None = None,
                     n_layers: int = N_LAYERS, name: str = "rbee-tiny-test") -> Path:
    """Write the model; `quant` ("Q8_0", "Q4_0", …) quantises the layers' matrices, which
    sends llama.cpp down its quantised kernels (where CPU-specific bugs live); `n_layers`
    makes it as deep as a real model (llama.cpp's load log grows with it)."""
    import gguf

    rng = np.random.default_rng(seed)
    n_vocab = BYTE0 + 256
    hd = N_EMBD // N_HEAD
    table = successors()
    slots = {tok: i for i, tok in enumerate(sorted(table))}  # one embedding slot each
    default_slot = len(slots)  # every other token shares one, and is followed by "a"

    embd = np.zeros((n_vocab, N_EMBD), dtype=np.float32)
    for tok in range(n_vocab):
        embd[tok, slots.get(tok, default_slot)] = np.sqrt(N_EMBD)
    out = np.zeros((n_vocab, N_EMBD), dtype=np.float32)
    for tok, slot in slots.items():
        out[table[tok], slot] = 4.0
    out[byte_token("a"), default_slot] = 4.0

    def small(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def matrix(name: str, *shape: int) -> None:
        data = small(*shape)
        if qtype is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(context_length)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    qtype = getattr(gguf.GGMLQuantizationType, quant) if quant else None
    w.add_file_type({None: 0, "Q8_0": 7, "Q4_0": 2, "Q4_1": 3}.get(quant, 0))
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
    w.add_tensor("token_embd.weight", embd)
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    w.add_tensor("output.weight", out)
    for i in range(n_layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        matrix(f"blk.{i}.attn_q.weight", N_HEAD * hd, N_EMBD)
        matrix(f"blk.{i}.attn_k.weight", N_HEAD_KV * hd, N_EMBD)
        matrix(f"blk.{i}.attn_v.weight", N_HEAD_KV * hd, N_EMBD)
        matrix(f"blk.{i}.attn_output.weight", N_EMBD, N_HEAD * hd)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        matrix(f"blk.{i}.ffn_gate.weight", N_FF, N_EMBD)
        matrix(f"blk.{i}.ffn_up.weight", N_FF, N_EMBD)
        matrix(f"blk.{i}.ffn_down.weight", N_EMBD, N_FF)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


if __name__ == "__main__":
    import sys

    print(write_tiny_model(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny.gguf")))
