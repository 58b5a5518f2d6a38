"""One llama.cpp model and the generation loop every route of the worker shares.

The loop runs in a thread (llama.cpp blocks); it hands text to the caller through a
callback and checks a cancel flag between tokens, so /cancel and a client that goes away
stop it within one token.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import logging
import os
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from rbee_common.names import Backend, StopReason, is_gpu
from worker.errors import BackendUnavailable, InvalidRequest, ModelLoadFailed

log = logging.getLogger("rbee.worker")

_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
# llama.cpp's buffers as it allocates them: weights, KV cache and compute, per device
_BUFFER = re.compile(r"^\S+:\s+(\S+) (?:model|KV|compute) buffer size =\s+([\d.]+) MiB")


@dataclass(frozen=True)
class EngineSettings:
    model_path: str
    backend: str  # cpu | cuda | metal
    ctx: int = 4096
    threads: int | None = None
    batch: int = 512
    n_devices: int = 1  # GPUs the worker spans; rbee-hive makes them 0..n-1 (CUDA_VISIBLE_DEVICES)
    tensor_split: tuple[float, ...] | None = None  # each device's share (lenders first)
    rpc: tuple[str, ...] = ()  # RPC lenders (HOST:PORT) that hold part of the model
    device_ids: tuple[int, ...] | None = None  # the devices as rbee-hive numbers them


@dataclass(frozen=True)
class GenParams:
    max_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: int | None = None  # None: none; N: each token's logprob and the N likeliest
    grammar: str | None = None  # GBNF the output must follow (JSON mode); checked already


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log probability, and the likeliest tokens at its place."""

    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass
class GenResult:
    tokens_out: int = 0
    stop_reason: StopReason = StopReason.MAX_TOKENS
    prompt_tokens: int = 0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when asked for

    @property
    def tokens_per_sec(self) -> float:
        # the first token's time is prompt processing; the rate is over the ones after it
        if self.tokens_out < 2 or self.decode_ms <= 0:
            return 0.0
        return (self.tokens_out - 1) / (self.decode_ms / 1000)

    def end_event(self) -> dict[str, Any]:
        return {
            "tokens_out": self.tokens_out,
            "stop_reason": self.stop_reason.value,
            "prompt_tokens": self.prompt_tokens,
            "ttft_ms": round(self.ttft_ms, 2),
            "decode_ms": round(self.decode_ms, 2),
            "tokens_per_sec": round(self.tokens_per_sec, 2),
        }


class StopMatcher:
    """Cuts the stream at the first stop string, holding back text that might start one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        self.buf += text
        if not self.stops:
            out, self.buf = self.buf, ""
            return out, False
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i != -1]
        if hits:
            out, self.buf = self.buf[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        cut = len(self.buf) - hold
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class LogitsTap:
    """A llama-cpp-python logits processor: adds the request's logit bias, and keeps the raw
    logits of the step (before bias, penalties and temperature) when logprobs are wanted."""

    def __init__(self, bias: tuple[tuple[int, float], ...], keep: bool) -> None:
        import numpy as np

        self.ids = np.array([t for t, _ in bias], dtype=np.intc)
        self.values = np.array([b for _, b in bias], dtype=np.single)
        self.keep = keep
        self.last: Any = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.keep:
            self.last = scores.copy()
        if len(self.ids):
            scores[self.ids] += self.values
        return scores


def token_logprob(logits: Any, token: int, top_n: int,
                  piece: Callable[[int], bytes]) -> TokenLogprob:
    """`token`'s log probability under these logits, with the `top_n` likeliest tokens."""
    import numpy as np

    peak = float(logits.max())
    log_z = peak + float(np.log(np.exp(logits - peak, dtype=np.float64).sum()))
    top: tuple[tuple[bytes, float], ...] = ()
    if top_n > 0:
        n = min(top_n, len(logits))
        ids = np.argpartition(-logits, n - 1)[:n]
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        top = tuple((piece(int(i)), float(logits[i]) - log_z) for i in ids)
    return TokenLogprob(piece(token), float(logits[token]) - log_z, top)


class LogLevel(IntEnum):
    """ggml's log levels as ggml.h numbers them (llama_cpp/_logger.py's comment shows an older
    order; tests/test_worker_engine.py checks this one against a real load)."""

    NONE = 0  # plain prints
    DEBUG = 1
    INFO = 2
    WARN = 3
    ERROR = 4
    CONT = 5  # continues the previous message, at its level


_INSTALLED_LOG_CALLBACK: Any = None


class LlamaLogCapture:
    """Collects llama.cpp's log lines (it logs from C, outside Python's logging).

    The offload count is read off its line as the line arrives: after it, a real model's
    load logs hundreds of debug lines (`llama_graph_n_input_tensors …`), so a window of
    recent lines loses it. Debug lines get their own, smaller window, so their chatter never
    pushes info, warnings and errors (what an error report needs) out of `lines`.
    """

    def __init__(self, keep: int = 400, keep_debug: int = 100) -> None:
        self.lines: deque[str] = deque(maxlen=keep)  # info, warnings, errors, plain prints
        self.debug: deque[str] = deque(maxlen=keep_debug)
        self.offload: tuple[int, int] | None = None  # (offloaded, total) layers, when logged
        self.buffers: dict[str, int] = {}  # bytes llama.cpp allocated, by buffer name
        self._partial = ""
        self._level = LogLevel.INFO  # of the line being assembled in _partial
        self._callback: Any = None

    def install(self) -> None:
        import llama_cpp

        @llama_cpp.llama_log_callback  # type: ignore[misc]
        def _cb(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            self.feed(level, text.decode("utf-8", errors="replace"))

        self._callback = _cb
        # llama.cpp keeps calling the last callback set, whatever happens to this capture:
        # the module keeps it alive until another replaces it (a freed one would crash)
        global _INSTALLED_LOG_CALLBACK
        _INSTALLED_LOG_CALLBACK = _cb
        llama_cpp.llama_log_set(_cb, ctypes.c_void_p(0))

    def feed(self, level: int, text: str) -> None:
        """Take one piece of llama.cpp's log (a line, part of one, or several) at its level."""
        if level != LogLevel.CONT:
            # a piece that joins an unfinished line can only raise its level: a warning
            # never hides among debug lines
            self._level = max(self._level, level) if self._partial else level
        self._partial += text
        while "\n" in self._partial:
            line, self._partial = self._partial.split("\n", 1)
            m = _OFFLOADED.search(line)
            if m:
                self.offload = int(m.group(1)), int(m.group(2))
            m = _BUFFER.match(line)
            if m:
                name = m.group(1)
                self.buffers[name] = self.buffers.get(name, 0) + int(float(m.group(2)) * 2**20)
            (self.debug if self._level == LogLevel.DEBUG else self.lines).append(line)

    def offloaded(self) -> tuple[int, int] | None:
        """(layers offloaded, layers in all) from the load's offload line; None if not logged."""
        return self.offload


def extra_buffer_types_wanted(backend: str) -> bool:
    """Whether llama.cpp may put weights in its "extra" buffer types (AMX, CPU repacking).

    On CPUs with Intel AMX, llama.cpp's AMX matmul for quantised weights segfaults
    (ggml-org/llama.cpp#20824; seen here with Q4_K_M and Q8_0), so CPU workers keep their
    weights in plain buffers on an AMX build. RBEE_LLAMA_EXTRA_BUFTS=1 or 0 overrides.
    """
    forced = os.environ.get("RBEE_LLAMA_EXTRA_BUFTS")
    if forced in ("0", "1"):
        return forced == "1"
    if backend != Backend.cpu:
        return True
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")
    return "AMX_INT8 = 1" not in info


@contextlib.contextmanager
def model_params(**fields: Any) -> Iterator[None]:
    """Set llama_model_params fields that llama_cpp.Llama() does not take as arguments."""
    import llama_cpp.llama_cpp as lc

    original = lc.llama_model_default_params

    def patched() -> Any:
        params = original()
        for name, value in fields.items():
            setattr(params, name, value)
        return params

    lc.llama_model_default_params = patched
    try:
        yield
    finally:
        lc.llama_model_default_params = original


@contextlib.contextmanager
def tolerant_chat_templates() -> Iterator[None]:
    """Let a model whose chat template does not compile load all the same.

    llama_cpp.Llama() compiles every chat template in the GGUF as it is built, after the
    weights are in, and one that jinja2 cannot parse (a typo, a tag it does not know) would
    throw the whole load away. For that call a template that does not compile is skipped
    (the worker compiles the model's template itself, once, and says what is wrong with it).
    """
    import jinja2
    from llama_cpp import llama_chat_format

    original = llama_chat_format.Jinja2ChatFormatter

    class Tolerant(original):  # type: ignore[misc, valid-type]
        def __init__(self, template: str, *args: Any, **kwargs: Any) -> None:
            try:
                super().__init__(template, *args, **kwargs)
            except jinja2.TemplateError:
                super().__init__("", *args, **kwargs)

    llama_chat_format.Jinja2ChatFormatter = Tolerant  # type: ignore[misc]
    try:
        yield
    finally:
        llama_chat_format.Jinja2ChatFormatter = original  # type: ignore[misc]


def llama_kwargs(s: EngineSettings, tensor_split: list[float] | None = None) -> dict[str, Any]:
    """The arguments Engine.load gives llama_cpp.Llama for these settings.

    A GPU worker offloads every layer (VRAM only). On one device it keeps the whole model
    there (no split); across several it splits by layer, in the proportions of
    `tensor_split` (even by default: llama.cpp's own default follows free memory, which the
    worker does not control). A worker that borrows from RPC lenders offloads every layer
    too, across [lenders…, its own devices], in the proportions `tensor_split` gives (the
    engine works them out from each device's free memory when the settings have none).
    """
    import llama_cpp

    gpu = is_gpu(s.backend)
    kwargs: dict[str, Any] = {
        "model_path": s.model_path,
        "n_ctx": s.ctx,
        "n_batch": min(s.batch, s.ctx),
        "n_gpu_layers": -1 if gpu or s.rpc else 0,
        "verbose": False,
    }
    if s.threads:
        kwargs["n_threads"] = s.threads
        kwargs["n_threads_batch"] = s.threads
    if s.rpc:
        kwargs["split_mode"] = llama_cpp.LLAMA_SPLIT_MODE_LAYER
        kwargs["tensor_split"] = list(tensor_split or s.tensor_split
                                      or [1.0] * (len(s.rpc) + s.n_devices))
    elif gpu and s.n_devices > 1:
        kwargs["split_mode"] = llama_cpp.LLAMA_SPLIT_MODE_LAYER
        kwargs["tensor_split"] = list(s.tensor_split or [1.0] * s.n_devices)
    elif gpu:
        # rbee-hive pins the worker's one device with CUDA_VISIBLE_DEVICES: here it is 0
        kwargs["split_mode"] = llama_cpp.LLAMA_SPLIT_MODE_NONE
        kwargs["main_gpu"] = 0
    return kwargs


def cuda_memory_of(pid: int, nvml_indexes: Iterable[int]) -> int:
    """Bytes of GPU memory the process holds on these devices, as NVML accounts it (0 if unknown).

    NVML ignores CUDA_VISIBLE_DEVICES: the indexes are the host's (as rbee-hive numbers them)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no NVML here: nothing to report
        return 0
    try:
        total = 0
        for index in nvml_indexes:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory:
                    total += int(proc.usedGpuMemory)
        return total
    except pynvml.NVMLError:
        return 0
    finally:
        pynvml.nvmlShutdown()


def gpu_offload_supported() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


class Engine:
    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.llama: Any = None
        self.logs = LlamaLogCapture()
        self.chat_template: str | None = None
        self.chat_formatter: Any = None  # the template compiled (llama_cpp's Jinja2ChatFormatter)
        self.names: list[str] = []  # each device of the split: RPC lenders first, then its own
        self.split: list[dict[str, Any]] = []  # their shares and bytes, once loaded

    @property
    def gpu(self) -> bool:
        return is_gpu(self.settings.backend)

    def check_backend(self) -> None:
        """Refuse a GPU backend the llama.cpp build cannot offload to (no CPU fallback), and
        RPC lenders on a build without RPC."""
        from worker.launch import build_backends

        backend = self.settings.backend
        if self.settings.rpc:
            from rbee_common.rpc import rpc_supported

            if not rpc_supported():
                from rbee_common.errors import RpcUnavailable

                raise RpcUnavailable("this llama-cpp-python build has no RPC backend: it "
                                     "cannot borrow memory from --rpc lenders")
        if self.gpu and not gpu_offload_supported():
            raise BackendUnavailable(
                f"this llama-cpp-python build cannot offload to a GPU, so backend "
                f"{backend!r} is unavailable"
            )
        # an RPC-enabled CPU build also says it can offload: it must have this backend itself
        if self.gpu and not build_backends()[backend]:
            raise BackendUnavailable(f"this llama-cpp-python build has no {backend} backend")

    def load(self) -> None:
        import llama_cpp

        self.logs.install()
        s = self.settings
        self.names = [f"rpc:{e}" for e in s.rpc] + [
            f"{s.backend}:{i}" for i in (s.device_ids or range(s.n_devices))]
        fields: dict[str, Any] = {}
        if s.rpc:
            devices, shares = self._borrow()
            fields["devices"] = ctypes.cast(devices, ctypes.c_void_p)
            kwargs = llama_kwargs(s, shares)
        else:
            kwargs = llama_kwargs(s)
        extra = extra_buffer_types_wanted(s.backend)
        if not extra:
            log.info("keeping weights out of llama.cpp's AMX/repack buffers (llama.cpp#20824); "
                     "RBEE_LLAMA_EXTRA_BUFTS=1 re-enables them")
        try:
            with model_params(use_extra_bufts=extra, **fields), tolerant_chat_templates():
                self.llama = llama_cpp.Llama(**kwargs)
        except (ValueError, RuntimeError, OSError) as e:
            tail = "\n".join(list(self.logs.lines)[-5:])
            raise ModelLoadFailed(f"llama.cpp could not load {s.model_path}: {e}",
                                  log_tail=tail) from e
        self._account(kwargs.get("tensor_split") or [1.0] * s.n_devices)
        if self.gpu or s.rpc:
            done = self.logs.offloaded()
            if done is None or done[0] < done[1]:
                got = f"{done[0]}/{done[1]}" if done else "an unknown number of"
                self.close()
                raise ModelLoadFailed(
                    f"only {got} layers were offloaded to {s.backend}"
                    + (" and its RPC lenders" if s.rpc else "")
                    + "; rbee runs GPU and split workers entirely on their devices",
                    hint="Free VRAM, or choose a smaller model, quantisation or --ctx.",
                )
        self.chat_template = self.llama.metadata.get("tokenizer.chat_template")
        self.chat_formatter = self.compile_chat_template()

    def compile_chat_template(self) -> Any:
        """The model's chat template compiled once, at load: compiling a real one takes
        milliseconds, which every chat request used to pay before its first token. None
        without a template, or (with a warning) when jinja2 cannot parse it."""
        if not self.chat_template:
            return None
        import jinja2
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        model = self.llama._model
        eos_id, bos_id = self.llama.token_eos(), self.llama.token_bos()
        try:
            return Jinja2ChatFormatter(
                template=self.chat_template,
                eos_token=model.token_get_text(eos_id) if eos_id != -1 else "",
                bos_token=model.token_get_text(bos_id) if bos_id != -1 else "",
                stop_token_ids=[eos_id],
            )
        except jinja2.TemplateError as e:
            log.warning("the model's chat template does not compile (%s: %s); chat requests "
                        "use the plain 'User: … Assistant:' format instead",
                        type(e).__name__, e)
            self.chat_template = None
            return None

    def _borrow(self) -> tuple[Any, list[float]]:
        """Add the RPC lenders as devices: the NULL-terminated device list for llama.cpp
        ([lenders…, this worker's own devices]) and each one's share of the model.

        llama.cpp aborts the whole process when an endpoint does not answer or speaks another
        protocol version, so every lender is asked first (rbee_common.rpc.handshake), each
        failure a coded error before any is added."""
        from rbee_common.rpc import ggml, handshake

        s = self.settings
        lib = ggml()
        lib.rpc_reg()  # RPC_UNAVAILABLE on a build without it
        infos = [handshake(endpoint) for endpoint in s.rpc]
        local = lib.local_devices(s.backend)[:s.n_devices]
        if len(local) < s.n_devices:
            raise BackendUnavailable(f"llama.cpp sees {len(local)} {s.backend} device(s) here, "
                                     f"{s.n_devices} wanted")
        lib.on_abort(self._aborted)
        lenders = [d for endpoint in s.rpc for d in lib.add_server(endpoint)[:1]]
        for info, dev in zip(infos, lenders, strict=True):
            log.info("borrowing %s (%s) at %s: %d MiB free of %d, protocol %s", dev.name,
                     dev.description, info.endpoint, info.free >> 20, info.total >> 20,
                     ".".join(map(str, info.version)))
        free = [info.free for info in infos] + [d.memory(lib).free for d in local]
        shares = list(s.tensor_split) if s.tensor_split else [
            round(f / sum(free), 4) if sum(free) else 1 / len(free) for f in free]
        handles = [d.handle for d in lenders + local]
        return (ctypes.c_void_p * (len(handles) + 1))(*handles, None), shares

    def _aborted(self, message: str) -> None:
        """ggml's last words before it aborts the process (a lender lost mid-generation):
        one RBEE_ERROR line, as a failed start writes, so rbee-hive can say what happened."""
        import json

        from rbee_common.errors import WorkerCrashed
        from worker.protocol import ERROR_LINE_PREFIX

        said = re.sub(r"^\S+:\d+: ", "", message.strip())  # less ggml's source file:line
        err = WorkerCrashed(f"llama.cpp aborted the worker: {said}", rpc=list(self.settings.rpc))
        with contextlib.suppress(OSError):
            os.write(2, (f"{message}\n{ERROR_LINE_PREFIX}{json.dumps(err.to_dict())}\n")
                     .encode())

    def _account(self, shares: list[float]) -> None:
        """Each device's share and the bytes llama.cpp allocated on it (weights, KV cache
        and compute buffers, from its log), for /health. A GPU worker's host buffers (pinned
        staging memory) count on no device."""
        s = self.settings
        spent = dict.fromkeys(self.names, 0)
        for buffer, size in self.logs.buffers.items():
            lender = next((e for e in s.rpc if f"[{e}]" in buffer), None)
            if lender is not None:
                spent[f"rpc:{lender}"] += size
            elif s.backend == Backend.cpu:
                spent[self.names[-1]] += size
            elif buffer.upper().startswith(("CUDA", "MTL", "METAL")) \
                    and "HOST" not in buffer.upper():
                digits = "".join(ch for ch in buffer if ch.isdigit())
                local = self.names[len(s.rpc):]
                index = int(digits) if digits else 0  # as this process numbers its devices
                if index < len(local):
                    spent[local[index]] += size
        total = sum(shares) or 1.0
        self.split = [{"device": name, "share": round(share / total, 4), "bytes": spent[name]}
                      for name, share in zip(self.names, shares, strict=True)]

    def close(self) -> None:
        if self.llama is not None:
            self.llama.close()
            self.llama = None

    @property
    def n_ctx(self) -> int:
        return int(self.llama.n_ctx())

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return list(self.llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    @property
    def n_vocab(self) -> int:
        return int(self.llama.n_vocab())

    def grammar_compiles(self, gbnf: str) -> bool:
        """Whether llama.cpp accepts this GBNF grammar for this model's vocabulary (it returns
        no sampler for one it cannot parse, and a chain given none crashes)."""
        import llama_cpp

        sampler = llama_cpp.llama_sampler_init_grammar(self.llama._model.vocab,
                                                       gbnf.encode("utf-8"), b"root")
        if not sampler:
            return False
        llama_cpp.llama_sampler_free(sampler)
        return True

    def format_chat(self, messages: list[tuple[str, str]]) -> tuple[str, list[str], bool]:
        """Render a conversation with the model's own chat template (or a plain fallback).

        Returns the prompt, extra stop strings, and whether the prompt already holds BOS.
        """
        if self.chat_formatter is not None:
            res = self.chat_formatter(messages=[{"role": r, "content": c} for r, c in messages])
            stops = [res.stop] if isinstance(res.stop, str) else list(res.stop or [])
            return res.prompt, stops, bool(res.added_special)
        parts = []
        for role, content in messages:
            label = "System" if role in ("system", "developer") else role.capitalize()
            parts.append(f"{label}: {content}")
        return "\n".join(parts) + "\nAssistant:", ["\nUser:"], False

    def generate(self, tokens: list[int], params: GenParams, cancel: threading.Event,
                 on_text: Callable[[str, int, list[TokenLogprob]], None]) -> GenResult:
        """Run one job to its end; call on_text(text, token_index, logprobs) as text becomes
        final (logprobs: of the tokens since the last call, when asked for)."""
        import llama_cpp
        from llama_cpp import LogitsProcessorList
        from llama_cpp.llama_grammar import LlamaGrammar

        t0 = time.perf_counter()
        n_ctx = self.n_ctx
        if len(tokens) >= n_ctx:
            raise InvalidRequest(f"the prompt is {len(tokens)} tokens; the context holds {n_ctx}",
                                 hint="Shorten the prompt or spawn the worker with a larger --ctx.",
                                 field="prompt")
        budget = min(params.max_tokens, n_ctx - len(tokens))
        result = GenResult(prompt_tokens=len(tokens))
        seed = params.seed if params.seed is not None else random.randrange(2**32)
        self.llama.set_seed(seed)
        vocab = self.llama._model.vocab
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stopper = StopMatcher(params.stop)
        first_at: float | None = None
        last_at = t0
        stop_reason = StopReason.MAX_TOKENS
        want_lp = params.logprobs is not None
        tap = LogitsTap(params.logit_bias, want_lp) if params.logit_bias or want_lp else None
        pending: list[TokenLogprob] = []  # logprobs of tokens whose text is held back

        def piece(token: int) -> bytes:
            return bytes(self.llama.detokenize([token]))

        gen = self.llama.generate(
            tokens, top_k=params.top_k, top_p=params.top_p, temp=params.temperature,
            repeat_penalty=params.repeat_penalty, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty, reset=True,
            logits_processor=LogitsProcessorList([tap]) if tap else None,
            grammar=LlamaGrammar.from_string(params.grammar) if params.grammar else None)
        try:
            for tok in gen:
                last_at = time.perf_counter()
                if first_at is None:
                    first_at = last_at
                if cancel.is_set():
                    stop_reason = StopReason.CANCELLED
                    break
                if llama_cpp.llama_vocab_is_eog(vocab, tok):
                    stop_reason = StopReason.EOS
                    break
                index = result.tokens_out
                result.tokens_out += 1
                if tap is not None and tap.last is not None:
                    lp = token_logprob(tap.last, tok, params.logprobs or 0, piece)
                    result.logprobs.append(lp)
                    pending.append(lp)
                text, hit = stopper.feed(decoder.decode(self.llama.detokenize([tok])))
                if text:
                    result.text.append(text)
                    on_text(text, index, pending)
                    pending = []
                if hit:
                    stop_reason = StopReason.STOP_SEQUENCE
                    break
                if result.tokens_out >= budget:
                    break
        finally:
            gen.close()
        if stop_reason is not StopReason.STOP_SEQUENCE:
            tail = stopper.feed(decoder.decode(b"", final=True))[0] + stopper.flush()
            if tail and stop_reason is not StopReason.CANCELLED:
                result.text.append(tail)
                on_text(tail, max(result.tokens_out - 1, 0), pending)
        result.stop_reason = stop_reason
        result.ttft_ms = ((first_at or last_at) - t0) * 1000
        result.decode_ms = (last_at - (first_at or last_at)) * 1000
        return result


def default_threads(backend: str) -> int | None:
    """CPU workers use every core by default (llama.cpp's own default is half of them), or
    RBEE_WORKER_THREADS of the host's env (several workers sharing a small box)."""
    if backend != Backend.cpu:
        return None
    from rbee_common.config import env_number

    configured = int(env_number("RBEE_WORKER_THREADS", 0, minimum=1))
    return configured or os.cpu_count() or None
