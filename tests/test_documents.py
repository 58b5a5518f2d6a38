"""The hive's documents are built in core (rbee_hive.documents): the CLI prints them byte for
byte, so the pool daemon can serve the same documents without going through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import Env
from tests.helpers import run


def _printed(doc: dict) -> str:
    """What `emit` writes for a document in --format json."""
    return json.dumps(doc, ensure_ascii=False) + "\n"


def test_cli_prints_the_core_documents_byte_for_byte(tiny_registered: str, tiny_model: Path,
                                                      rbee_env: Env) -> None:
    from rbee_hive import documents

    other = rbee_env.root / "other.gguf"
    other.write_bytes(tiny_model.read_bytes())
    cases = [
        (("models", "catalog"), documents.catalog),
        (("models", "list"), documents.models),
        (("models", "info", "tiny", "--ctx", "8192"), lambda: documents.model_info("tiny", 8192)),
        # a file: source that is not registered is read where it lies
        (("models", "info", f"file:{other}"), lambda: documents.model_info(f"file:{other}")),
        (("models", "verify", "tiny"), lambda: documents.verify("tiny")),
        (("worker", "list"), documents.workers),
    ]
    for args, build in cases:
        r = run("rbee-hive", *args, "--format", "json")
        assert r.returncode == 0, r
        assert r.stdout == _printed(build()), args
    info = documents.model_info(f"file:{other}")
    assert info["downloaded"] is False and info["estimate"]["total_bytes"] > 0
    assert "sha256" in info and info["sha256"] is None  # not hashed until it is imported


def test_worker_documents_match_the_cli(tiny_registered: str) -> None:
    from rbee_hive import documents

    rec = run("rbee-hive", "worker", "spawn", "cpu", "--model", "tiny", "--format", "json").json()
    wid = rec["id"]
    for args, build in [
        (("worker", "token", wid), lambda: documents.worker_token(wid)),
        (("worker", "logs", wid, "--lines", "5"), lambda: documents.worker_logs(wid, 5)),
    ]:
        r = run("rbee-hive", *args, "--format", "json")
        assert r.returncode == 0, r
        assert r.stdout == _printed(build()), args
    health = documents.worker_health(wid)
    assert health["schema"] == "rbee.hive.worker-health/v1" and health["worker_id"] == wid
    stopped = documents.stop_all(grace=5.0)
    assert stopped["schema"] == "rbee.hive.stopped/v1"
    assert [s["id"] for s in stopped["stopped"]] == [wid]
    assert run("rbee-hive", "worker", "list", "--format", "json").stdout == _printed(
        {"schema": "rbee.hive.workers/v1", "workers": []})
