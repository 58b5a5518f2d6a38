"""What a chat request pays to turn its messages into a prompt before its first token: the
worker as shipped (the model's chat template compiled once, at load) against what it did
before (the template compiled on every request), in the same run, on the same loaded model.

Templates: the model's own (--model PATH.gguf), else the tiny model written with each chat
template llama-cpp-python bundles (ChatML, Mistral Instruct, Llama 3 Instruct).

    python bench/chat_template.py [--model PATH.gguf] [--runs 200]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import Sandbox, emit, median, parser, ratio

# a short conversation every template accepts (user and assistant alternate)
MESSAGES = [("user", "What is the capital of France?"), ("assistant", "Paris."),
            ("user", "And of Italy?")]


def per_request(engine: Any) -> Callable[[], Any]:
    """The worker's chat formatting before the template was compiled once: compile the
    template on every request, then render."""
    def run() -> Any:
        formatter = engine.compile_chat_template()
        return formatter(messages=[{"role": r, "content": c} for r, c in MESSAGES]).prompt

    return run


def measure(model: Path, runs: int) -> dict[str, Any]:
    from worker.engine import Engine, EngineSettings

    engine = Engine(EngineSettings(model_path=str(model), backend="cpu", ctx=256, threads=1))
    engine.load()
    try:
        if engine.chat_formatter is None:
            return {"template_chars": 0, "skipped": "the model has no chat template"}
        shipped = lambda: engine.format_chat(MESSAGES)[0]  # noqa: E731
        before = per_request(engine)
        assert shipped() == before(), "the two paths must render the same prompt"
        times: dict[str, list[float]] = {"shipped": [], "per_request": []}
        for _ in range(runs):  # interleaved, so machine noise falls on both alike
            for name, fn in (("shipped", shipped), ("per_request", before)):
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1000)
        ms = {name: median(values) for name, values in times.items()}
        return {"template_chars": len(engine.chat_template or ""),
                "shipped_ms": ms["shipped"], "per_request_compile_ms": ms["per_request"],
                "saved_per_chat_request_ms": round(ms["per_request"] - ms["shipped"], 3),
                "ratio_shipped_vs_per_request": ratio(ms["shipped"], ms["per_request"])}
    finally:
        engine.close()


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--runs", type=int, default=200)
    args = p.parse_args()
    runs = 20 if args.quick else args.runs
    results = {}
    with Sandbox() as box:
        if args.model is not None:
            results[args.model.name] = measure(args.model.resolve(), runs)
        else:
            from llama_cpp import llama_chat_format as bundled

            from tests.tinymodel import write_tiny_model

            for name in ("CHATML_CHAT_TEMPLATE", "MISTRAL_INSTRUCT_CHAT_TEMPLATE",
                         "LLAMA3_INSTRUCT_CHAT_TEMPLATE"):
                model = write_tiny_model(box.root / f"{name.lower()}.gguf",
                                         chat_template=getattr(bundled, name))
                results[name.removesuffix("_CHAT_TEMPLATE").lower()] = measure(model, runs)
    emit({"benchmark": "chat_template", "runs": runs, "messages": len(MESSAGES),
          "results": results}, args.out)


if __name__ == "__main__":
    main()
