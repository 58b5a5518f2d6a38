"""Every error code rbee can print, with what it means, its exit code and its usual hint:
the reference behind docs/errors.md, read from the error classes themselves so the two
cannot drift apart (tests/test_errorcodes.py checks the file against this).

    python -m rbee_common.errorcodes > docs/errors.md
"""

from __future__ import annotations

import importlib
import inspect
import sys
from dataclasses import dataclass

from rbee_common.errors import RbeeError, RemoteError

# every module that defines an error class (tests/test_errorcodes.py finds any it misses)
MODULES = (
    "rbee_common.api", "rbee_common.daemon", "rbee_common.errors", "rbee_common.ggufmeta",
    "rbee_common.models", "rbee_common.rpc", "rbee_hive.download", "rbee_hive.errors",
    "rbee_keeper.errors", "rbee_keeper.jobs", "rbee_keeper.queen.runtime",
    "rbee_keeper.queen.ui", "rbee_keeper.queen_client", "rbee_keeper.worker_client",
    "worker.errors", "worker.jobs",
)


# the base class's code: what reaches a user unexpected
INTERNAL = "Something failed that rbee did not foresee (a bug): the message says what."


@dataclass(frozen=True)
class Code:
    code: str
    exit_code: int
    meanings: tuple[str, ...]  # the first line of each class's docstring
    hints: tuple[str, ...]


def _classes() -> list[type[RbeeError]]:
    for name in MODULES:
        importlib.import_module(name)
    seen: list[type[RbeeError]] = []
    todo: list[type[RbeeError]] = [RbeeError]
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.append(cls)
            todo.extend(cls.__subclasses__())
    # only these modules' classes: the catalog must not depend on what else was imported
    return [c for c in seen if c is not RemoteError  # it carries another process's code
            and c.__module__ in MODULES]


def catalog() -> list[Code]:
    """One entry per code, in alphabetical order."""
    by_code: dict[str, list[type[RbeeError]]] = {}
    for cls in _classes():
        by_code.setdefault(cls.code, []).append(cls)
    out = []
    for code, classes in sorted(by_code.items()):
        classes.sort(key=lambda c: (c.__module__, c.__qualname__))
        meanings = [INTERNAL if c is RbeeError
                    else (inspect.getdoc(c) or "").split("\n\n")[0].replace("\n", " ")
                    for c in classes]
        hints = [c.default_hint for c in classes]
        out.append(Code(code, max(c.exit_code for c in classes),
                        tuple(dict.fromkeys(m for m in meanings if m)),
                        tuple(dict.fromkeys(h for h in hints if h))))
    return out


def markdown() -> str:
    lines = [
        "# Error codes",
        "",
        "Every rbee command, daemon and worker reports a failure as a code, a message and a "
        "hint; with `--format json` as `{\"error\": {\"code\", \"message\", \"hint\", "
        "\"details\"}}`, over HTTP in the same envelope (the OpenAI routes: OpenAI's shape, "
        "rbee's code beside it). The message names what failed; the hint below is the usual "
        "one (a message may carry a more specific one).",
        "",
        "Generated from the error classes by `python -m rbee_common.errorcodes > "
        "docs/errors.md`; a test fails when this file is out of date.",
        "",
        "Exit codes: 0 ok, 1 failure, 2 usage, 3 partial (some hosts failed), 130 interrupted.",
        "",
    ]
    for c in catalog():
        lines += [f"## {c.code}", ""]
        if len(c.meanings) == 1:
            lines.append(c.meanings[0])
        else:
            lines += [f"- {m}" for m in c.meanings]
        lines += ["", f"Exit code {c.exit_code}."]
        lines += ["", *(f"Hint: {h}" for h in c.hints)] if c.hints else \
            ["", "The hint comes with the message (it depends on what failed)."]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(markdown())
