"""The worker's engine, in process and without a GPU: llama.cpp's log capture and the
stop-string matcher."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.tinymodel import write_tiny_model
from worker.engine import Engine, EngineSettings, LlamaLogCapture, StopMatcher
from worker.errors import BackendUnavailable
from worker.launch import build_backends

# ggml.h's log levels
DEBUG, INFO, WARN, ERROR, CONT = 1, 2, 3, 4, 5

Emit = Callable[[int, str], None]


def _current_logger() -> tuple[object, ctypes.c_void_p]:
    import llama_cpp

    callback, user_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(callback), ctypes.byref(user_data))
    return callback, user_data


@pytest.fixture
def llama_log() -> Iterator[Emit]:
    """Log through whatever callback llama.cpp holds, as llama.cpp itself calls it (from C);
    the callback that was there before the test is put back after it."""
    import llama_cpp

    before = _current_logger()

    def emit(level: int, text: str) -> None:
        callback, user_data = _current_logger()
        callback(level, text.encode(), user_data)  # type: ignore[operator]

    yield emit
    llama_cpp.llama_log_set(*before)


def graph_lines(n: int) -> Iterator[str]:
    """`n` lines like those llama.cpp logs (at debug) while it reserves compute graphs."""
    inputs = [("out_ids", "i32", "{     1,     1,     1,     1 }", "node_{l}", "GET_ROWS"),
              ("attn_inp_kq_mask", "f32", "{  4096,     1,     1,     1 }", "kq_soft_max-{l}",
               "SOFT_MAX"),
              ("attn_inp_v_idxs", "i64", "{   256,     1,     1,     1 }",
               "cache_v_l{l} (reshaped) (view)", "SET_ROWS"),
              ("attn_inp_k_idxs", "i64", "{     1,     1,     1,     1 }", "cache_k_l{l} (view)",
               "SET_ROWS"),
              ("inp_pos", "i32", "{     1,     1,     1,     1 }", "Qcur-{l}", "ROPE")]
    for i in range(n):
        if i % 111 == 0:
            yield ("graph_reserve: reserving a graph for ubatch with n_tokens =    1, "
                   "n_seqs =  1, n_outputs =    1\n")
        name, typ, ne, node, op = inputs[i % len(inputs)]
        yield (f"llama_graph_n_input_tensors: input tensor '{name:>32}' [{typ}, ne = {ne}] "
               f"is used by node '{node.format(l=i % 22)}' ({op})\n")


def load_22_layer_model(emit: Emit) -> None:
    """What llama.cpp logs while it loads a 22-layer model onto one CUDA device."""
    emit(INFO, "load_tensors: loading model tensors, this can take a while... "
               "(load_mode = mmap)\n")
    for layer in range(23):
        emit(DEBUG, f"load_tensors: layer {layer:>3} assigned to device CUDA0, is_swa = 0\n")
    emit(INFO, "load_tensors: offloading output layer to GPU\n")
    emit(INFO, "load_tensors: offloading 21 repeating layers to GPU\n")
    emit(INFO, "load_tensors: offloaded 23/23 layers to GPU\n")
    emit(INFO, "load_tensors:        CUDA0 model buffer size =  1885.36 MiB\n")
    emit(INFO, "load_tensors:   CPU_Mapped model buffer size =   125.00 MiB\n")
    for _ in range(40):
        emit(CONT, ".")
    emit(CONT, "\n")
    emit(INFO, "llama_context: constructing llama_context\n")
    emit(WARN, "llama_context: n_ctx_seq (4096) < n_ctx_train (32768) -- the full capacity "
               "of the model will not be utilized\n")
    for line in graph_lines(1000):
        emit(DEBUG, line)
    emit(INFO, "llama_context:      CUDA0 compute buffer size =   300.75 MiB\n")


def test_offload_count_survives_a_flood_of_debug_lines(llama_log: Emit) -> None:
    """A real model's load logs hundreds of graph lines after the offload line (seen on an
    H100 with a 22-layer model: every CUDA spawn failed with 'an unknown number of layers')."""
    capture = LlamaLogCapture()
    capture.install()
    load_22_layer_model(llama_log)
    assert capture.offloaded() == (23, 23)
    # what an error report needs is still there; the graph chatter is not in its way
    lines = list(capture.lines)
    assert "load_tensors: offloaded 23/23 layers to GPU" in lines
    assert any("n_ctx_seq (4096) < n_ctx_train" in line for line in lines)
    assert lines[-1] == "llama_context:      CUDA0 compute buffer size =   300.75 MiB"
    assert not any("llama_graph_n_input_tensors" in line for line in lines)


def test_a_real_load_sorts_llama_cpps_lines_by_level(tiny_model: Path,
                                                      llama_log: Emit) -> None:
    engine = Engine(EngineSettings(model_path=str(tiny_model), backend="cpu", ctx=256))
    engine.load()
    try:
        logs = engine.logs
        assert any(line.startswith("llama_graph_n_input_tensors: ") for line in logs.debug)
        assert not any("llama_graph_n_input_tensors" in line for line in logs.lines)
        assert any(line.startswith("load_tensors: ") for line in logs.lines)
        assert logs.offloaded() == (0, 3)  # a cpu worker offloads nothing
    finally:
        engine.close()


def test_vram_only_check_passes_on_a_deep_model(tmp_path: Path, llama_log: Emit) -> None:
    """The GPU path's offload check on a real load of a 24-layer model, whose load logs more
    graph lines after the offload line than the capture keeps. (A CPU-only build has no GPU
    to offload to; llama.cpp then "offloads" to the CPU and logs the same lines.)"""
    model = write_tiny_model(tmp_path / "deep.gguf", n_layers=24)
    engine = Engine(EngineSettings(model_path=str(model), backend="cuda", ctx=256))
    engine.load()
    try:
        assert engine.logs.offloaded() == (25, 25)
        assert len(engine.logs.debug) == engine.logs.debug.maxlen  # the flood did happen
    finally:
        engine.close()


def run_stops(stops: tuple[str, ...], pieces: list[str]) -> tuple[list[str], bool, str]:
    """Feed `pieces` (token texts) until a stop hits: what came out per piece, whether a stop
    hit, and what flush() then gives."""
    matcher = StopMatcher(stops)
    out: list[str] = []
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out.append(text)
        if hit:
            return out, True, matcher.flush()
    return out, False, matcher.flush()


def test_without_stops_text_passes_straight_through() -> None:
    assert run_stops((), ["Hel", "lo", " <", "/s>"]) == (["Hel", "lo", " <", "/s>"], False, "")


def test_stop_split_across_tokens_is_held_back_then_cut() -> None:
    out, hit, rest = run_stops(("</s>",), ["ab", "c<", "/s", ">tail"])
    assert out == ["ab", "c", "", ""] and hit and rest == ""


def test_stop_inside_one_token_keeps_the_text_before_it() -> None:
    assert run_stops(("END",), ["one ", "twoENDthree"]) == (["one ", "two"], True, "")


def test_a_false_start_is_released_when_it_stops_matching() -> None:
    out, hit, _ = run_stops(("</s>",), ["a<", "/", "x", "b"])
    assert out == ["a", "", "</x", "b"] and not hit


def test_several_stops_the_earliest_in_the_text_wins() -> None:
    assert run_stops(("xyz", "b"), ["a", "bxyz"]) == (["a", ""], True, "")
    # "bcde" starts before "cd" does, so the text is cut where "bcde" starts
    assert run_stops(("cd", "bcde"), ["ab", "cde"]) == (["a", ""], True, "")
    assert run_stops(("cd", "bcdx"), ["ab", "cde"]) == (["a", "b"], True, "")


def test_hold_back_covers_the_longest_possible_start_of_any_stop() -> None:
    matcher = StopMatcher(("\nUser:", "ZZ"))
    assert matcher.feed("Hi\nUs") == ("Hi", False)  # "\nUs" may start "\nUser:"
    assert matcher.feed("Z") == ("\nUs", False)  # "\nUsZ" does not, but "Z" may start "ZZ"
    assert matcher.feed("!") == ("Z!", False)


def test_flush_gives_back_what_was_held_when_the_stream_ends() -> None:
    matcher = StopMatcher(("</s>",))
    assert matcher.feed("done </") == ("done ", False)
    assert matcher.flush() == "</"
    assert matcher.flush() == ""


@pytest.mark.parametrize("backend", ["cuda", "metal"])
def test_a_gpu_backend_the_build_lacks_is_refused(backend: str, tiny_model: Path) -> None:
    """llama_supports_gpu_offload() is also true for a CPU build with RPC (as here), which
    would then run a "cuda" worker on the CPU: a silent fallback DESIGN.md §4 forbids."""
    if build_backends()[backend]:
        pytest.skip(f"this llama-cpp-python build has the {backend} backend")
    engine = Engine(EngineSettings(model_path=str(tiny_model), backend=backend))
    with pytest.raises(BackendUnavailable, match=f"no {backend} backend"):
        engine.check_backend()
