"""Models published in several files (llama.cpp's gguf-split): fetched, resumed and verified
file by file, registered as one model, estimated from every file's header, loaded by a real
llama.cpp from the first file.

The split model is the tests' tiny model written in three files by the `gguf` package (the
same weights as the `tiny_model` fixture), so its greedy text must equal the whole model's.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import Env
from tests.helpers import error_of, run
from tests.hubserver import COMMIT, HubServer
from tests.tinymodel import write_split_tiny_model

REPO = "rbee-test/Split-GGUF"
NAMES = [f"tiny-{no:05d}-of-00003.gguf" for no in (1, 2, 3)]


@pytest.fixture(scope="session")
def other_split(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Another model (four layers, other weights) in three files."""
    return write_split_tiny_model(tmp_path_factory.mktemp("other") / "tiny.gguf", files=3,
                                  n_layers=4, seed=7)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listed(*args: str) -> list[dict]:  # type: ignore[type-arg]
    r = run("rbee-hive", "models", "list", "--format", "json", *args)
    assert r.returncode == 0, r
    return list(r.json()["models"])


def serve(hub: HubServer, files: list[Path], names: list[str] = NAMES) -> None:
    for path, name in zip(files, names, strict=True):
        hub.add_repo_file(REPO, name, path.read_bytes())


def test_the_split_files_are_what_gguf_split_writes(split_files: list[Path],
                                                    tiny_model: Path) -> None:
    from gguf import GGUFReader

    readers = [GGUFReader(p) for p in split_files]
    assert [p.name for p in split_files] == NAMES
    for no, reader in enumerate(readers):
        fields = reader.fields
        assert fields["split.no"].contents() == no
        assert fields["split.count"].contents() == 3
        assert fields["split.tensors.count"].contents() == len(GGUFReader(tiny_model).tensors)
    assert "llama.block_count" in readers[0].fields  # the model's facts: in the first file
    assert "llama.block_count" not in readers[1].fields
    assert all(r.tensors for r in readers)


def test_a_split_model_from_the_hub_downloads_as_one_model(hub: HubServer, rbee_env: Env,
                                                           split_files: list[Path]) -> None:
    serve(hub, split_files)
    # any file of the model names it: here the second
    r = run("rbee-hive", "models", "download", f"hf:{REPO}/{NAMES[1]}", "--format", "json")
    assert r.returncode == 0, r
    rec = r.json()
    assert rec["id"] == "tiny" and rec["source"] == f"hf:{REPO}/{NAMES[0]}"
    assert rec["revision"] == COMMIT
    sizes = [p.stat().st_size for p in split_files]
    assert rec["size"] == sum(sizes) and rec["transferred_bytes"] == sum(sizes)
    shards = rec["shards"]
    assert [Path(s["path"]).name for s in shards] == NAMES
    assert [s["size"] for s in shards] == sizes
    assert [s["sha256"] for s in shards] == [sha(p) for p in split_files]
    assert rec["path"] == shards[0]["path"] and rec["sha256"] == shards[0]["sha256"]
    folder = rbee_env.rbee_home / "models" / "tiny.shards"
    assert sorted(p.name for p in folder.iterdir()) == NAMES
    for s, p in zip(shards, split_files, strict=True):
        assert Path(s["path"]).read_bytes() == p.read_bytes()
    assert not (rbee_env.rbee_home / "downloads" / "tiny.shards").exists()

    (entry,) = listed()
    assert entry["id"] == "tiny" and entry["size"] == sum(sizes) and len(entry["shards"]) == 3
    text = run("rbee-hive", "models", "list")
    assert "in 3 files" in text.stdout, text

    assert sorted(g.path.rsplit("/", 1)[1] for g in hub.gets()) == NAMES
    again = run("rbee-hive", "models", "download", f"hf:{REPO}/{NAMES[2]}", "--format", "json")
    assert again.returncode == 0, again
    assert again.json()["already_present"] is True and len(hub.gets()) == 3


def test_one_progress_bar_over_all_the_files(hub: HubServer, split_files: list[Path]) -> None:
    for p in split_files:
        hub.add_file(p.name, p.read_bytes())
    hub.state.bytes_per_sec = 500_000  # slow enough for several (throttled) progress lines
    r = run("rbee-hive", "models", "download", f"{hub.url}/files/{NAMES[0]}",
            "--format", "ndjson")
    assert r.returncode == 0, r
    events = r.lines()
    download = [e for e in events if e.get("phase") == "download"]
    phases = [e for e in download if e["event"] == "phase"]
    total = sum(p.stat().st_size for p in split_files)
    assert len(phases) == 1 and phases[0]["total"] == total
    done = [e["completed"] for e in download if e["event"] == "progress"]
    # one bar: the count goes on from file to file, up to the total of all three
    assert done == sorted(done) and done[-1] <= total
    assert done[-1] > split_files[0].stat().st_size
    assert [e["event"] for e in download].count("done") == 1
    result = events[-1]["result"]
    assert result["id"] == "tiny" and result["size"] == total


def test_a_file_cut_off_resumes_and_nothing_is_registered_until_all_are_there(
        hub: HubServer, rbee_env: Env, split_files: list[Path]) -> None:
    serve(hub, split_files)
    hub.drop_next(after_bytes=50_000, path=NAMES[1])
    ref = f"hf:{REPO}/{NAMES[0]}"
    first = run("rbee-hive", "models", "download", ref, "--format", "json",
                env={"RBEE_DOWNLOAD_RETRIES": "0"})
    assert first.returncode == 1, first
    err = error_of(first)
    assert err["code"] == "DOWNLOAD_FAILED" and "resume" in err["hint"]
    assert NAMES[1] in err["message"]
    assert listed() == []
    assert not (rbee_env.rbee_home / "models" / "tiny.shards").exists()
    parts = rbee_env.rbee_home / "downloads" / "tiny.shards"
    assert (parts / "00001-of-00003.part").stat().st_size == split_files[0].stat().st_size
    assert (parts / "00002-of-00003.part").stat().st_size == 50_000
    assert not (parts / "00003-of-00003.part").exists()

    gets = len(hub.gets())
    second = run("rbee-hive", "models", "download", ref, "--format", "json")
    assert second.returncode == 0, second
    rec = second.json()
    sizes = [p.stat().st_size for p in split_files]
    assert rec["resumed_from"] == sizes[0] + 50_000
    assert rec["transferred_bytes"] == sizes[1] - 50_000 + sizes[2]
    resumed = hub.gets()[gets:]
    assert [(g.path.rsplit("/", 1)[1], g.range) for g in resumed] == [
        (NAMES[1], "bytes=50000-"), (NAMES[2], None)]
    assert [s["sha256"] for s in rec["shards"]] == [sha(p) for p in split_files]
    assert not parts.exists()


def test_a_file_that_fails_its_checksum_registers_nothing_and_only_it_is_fetched_again(
        hub: HubServer, rbee_env: Env, split_files: list[Path]) -> None:
    serve(hub, split_files)
    hub.add_repo_file(REPO, NAMES[2], split_files[2].read_bytes(), etag="f" * 64)
    r = run("rbee-hive", "models", "download", f"hf:{REPO}/{NAMES[0]}", "--format", "json")
    assert r.returncode == 1, r
    err = error_of(r)
    assert err["code"] == "CHECKSUM_MISMATCH" and NAMES[2] in err["message"]
    assert err["details"]["expected"] == "f" * 64
    assert listed() == []
    parts = rbee_env.rbee_home / "downloads" / "tiny.shards"
    assert sorted(p.name for p in parts.glob("*.part")) == ["00001-of-00003.part",
                                                             "00002-of-00003.part"]

    hub.add_repo_file(REPO, NAMES[2], split_files[2].read_bytes())  # the Hub fixed it
    gets = len(hub.gets())
    ok = run("rbee-hive", "models", "download", f"hf:{REPO}/{NAMES[0]}", "--format", "json")
    assert ok.returncode == 0, ok
    assert [g.path.rsplit("/", 1)[1] for g in hub.gets()[gets:]] == [NAMES[2]]
    assert ok.json()["transferred_bytes"] == split_files[2].stat().st_size


def test_a_missing_file_at_the_source_is_shard_missing_before_any_transfer(
        hub: HubServer, rbee_env: Env, split_files: list[Path]) -> None:
    serve(hub, [split_files[0], split_files[2]], [NAMES[0], NAMES[2]])
    r = run("rbee-hive", "models", "download", f"hf:{REPO}/{NAMES[0]}", "--format", "json")
    assert r.returncode == 1, r
    err = error_of(r)
    assert err["code"] == "SHARD_MISSING" and NAMES[1] in err["message"]
    assert err["details"]["missing"] == [NAMES[1]] and "gguf-split" in err["hint"]
    assert hub.gets() == [] and listed() == []

    for p in (split_files[0], split_files[2]):
        hub.add_file(p.name, p.read_bytes())
    r = run("rbee-hive", "models", "download", f"{hub.url}/files/{NAMES[2]}", "--format", "json")
    assert r.returncode == 1 and error_of(r)["code"] == "SHARD_MISSING", r
    assert listed() == []


def test_a_split_model_in_the_hugging_face_cache_serves_offline(
        hub: HubServer, rbee_env: Env, split_files: list[Path]) -> None:
    serve(hub, split_files)
    r = run("rbee-hive", "models", "download", f"hf:{REPO}/{NAMES[0]}", "--format", "json")
    assert r.returncode == 0, r
    blobs = rbee_env.root / "hf" / "hub" / "models--rbee-test--Split-GGUF" / "blobs"
    for s in r.json()["shards"]:
        assert os.stat(s["path"]).st_ino == (blobs / s["sha256"]).stat().st_ino

    # offline, in a second state dir: every file comes from the cache, the hub is never asked
    requests = len(hub.state.log)
    other = run("rbee-hive", "models", "download", f"hf:{REPO}/{NAMES[1]}", "--format", "json",
                env={"HF_HUB_OFFLINE": "1", "RBEE_HOME": str(rbee_env.root / "other")})
    assert other.returncode == 0, other
    assert len(hub.state.log) == requests
    rec = other.json()
    assert rec["revision"] == COMMIT and len(rec["shards"]) == 3
    for s in rec["shards"]:
        assert os.stat(s["path"]).st_ino == (blobs / s["sha256"]).stat().st_ino

    # online, a third state dir: the Hub names the blobs, none is transferred again
    gets = len(hub.gets())
    third = run("rbee-hive", "models", "download", f"hf:{REPO}/{NAMES[0]}", "--format", "json",
                env={"RBEE_HOME": str(rbee_env.root / "third")})
    assert third.returncode == 0, third
    assert len(hub.gets()) == gets and third.json()["transferred_bytes"] == 0


def copy_as(files: list[Path], folder: Path, names: list[str]) -> Path:
    folder.mkdir()
    for path, name in zip(files, names, strict=True):
        shutil.copy(path, folder / name)
    return folder / names[0]


@pytest.mark.parametrize("case, code, needle", [
    ("missing", "SHARD_MISSING", "tiny-00002-of-00003.gguf"),
    ("count", "SHARD_MISMATCH", "says the model is in 3 files"),
    ("other model", "SHARD_MISMATCH", "belongs to another model"),
    ("swapped names", "SHARD_MISMATCH", "says it is file 3"),
    ("whole model named as a file", "SHARD_MISMATCH", "is a whole model"),
    ("renamed first file", "SHARD_MISMATCH", "name does not say so"),
])
def test_files_that_are_not_one_split_model_register_nothing(
        rbee_env: Env, split_files: list[Path], other_split: list[Path], tiny_model: Path,
        case: str, code: str, needle: str) -> None:
    d = rbee_env.root / "in"
    first = {
        "missing": lambda: copy_as([split_files[0], split_files[2]], d, [NAMES[0], NAMES[2]]),
        # the first two files of a model in three, named as a model in two
        "count": lambda: copy_as(split_files[:2], d, ["tiny-00001-of-00002.gguf",
                                                      "tiny-00002-of-00002.gguf"]),
        "other model": lambda: copy_as([split_files[0], other_split[1], split_files[2]], d,
                                       NAMES),
        "swapped names": lambda: copy_as([split_files[0], split_files[2], split_files[1]], d,
                                         NAMES),
        "whole model named as a file": lambda: copy_as([tiny_model, tiny_model], d, [
            "tiny-00001-of-00002.gguf", "tiny-00002-of-00002.gguf"]),
        "renamed first file": lambda: copy_as(split_files[:1], d, ["tiny.gguf"]),
    }[case]()
    for args in (("download", f"file:{first}"), ("import", str(first))):
        r = run("rbee-hive", "models", *args, "--format", "json")
        assert r.returncode == 1, r
        err = error_of(r)
        assert err["code"] == code and needle in err["message"], err
        assert err["hint"]
        assert listed() == []
        models = rbee_env.rbee_home / "models"
        assert not models.exists() or not list(models.rglob("*.gguf"))
    text = run("rbee-hive", "models", "import", str(first))
    assert text.returncode == 1 and code in text.stderr and "Hint:" in text.stderr


def test_the_estimate_reads_every_file(rbee_env: Env, split_files: list[Path],
                                       tiny_model: Path) -> None:
    from gguf import GGUFReader

    assert run("rbee-hive", "models", "import", str(split_files[1]), "--id", "split",
               "--copy").returncode == 0
    info = run("rbee-hive", "models", "info", "split", "--ctx", "4096", "--format", "json")
    assert info.returncode == 0, info
    doc = info.json()
    weights = sum(p.stat().st_size - GGUFReader(p).data_offset for p in split_files)
    assert doc["estimate"]["weights_bytes"] == weights
    whole = run("rbee-hive", "models", "info", f"file:{tiny_model}", "--ctx", "4096",
                "--format", "json").json()
    assert weights == whole["estimate"]["weights_bytes"]  # the same tensors, the same bytes
    assert doc["estimate"] == whole["estimate"]
    g, w = doc["gguf"], whole["gguf"]
    for key in ("architecture", "block_count", "context_length", "head_count",
                "head_count_kv", "kv_per_token", "parameters", "tensor_count", "name"):
        assert g[key] == w[key], key
    # an unregistered file: reference reads all three where they lie
    loose = run("rbee-hive", "models", "info", f"file:{split_files[2]}", "--format", "json")
    assert loose.returncode == 0, loose
    assert loose.json()["estimate"]["weights_bytes"] == weights
    assert len(loose.json()["shards"]) == 3

    status = run("rbee-hive", "status", "--format", "json").json()
    (m,) = status["models"]
    assert m["size"] - m["data_offset"] == weights  # what the keeper's placement computes


def test_verify_and_rm_cover_every_file(rbee_env: Env, split_files: list[Path]) -> None:
    r = run("rbee-hive", "models", "import", str(split_files[0]), "--copy", "--format", "json")
    assert r.returncode == 0, r
    rec = r.json()
    assert rec["id"] == "tiny" and len(rec["shards"]) == 3
    ok = run("rbee-hive", "models", "verify", "tiny", "--format", "json")
    assert ok.returncode == 0 and ok.json()["size"] == rec["size"], ok
    with open(rec["shards"][2]["path"], "ab") as f:
        f.write(b"tampered")
    bad = run("rbee-hive", "models", "verify", "tiny", "--format", "json")
    assert bad.returncode == 1 and error_of(bad)["code"] == "CHECKSUM_MISMATCH"
    assert NAMES[2] in error_of(bad)["message"]

    gone = run("rbee-hive", "models", "rm", "tiny", "--format", "json")
    assert gone.returncode == 0, gone
    assert gone.json()["freed_bytes"] == rec["size"] + len(b"tampered")
    assert not (rbee_env.rbee_home / "models" / "tiny.shards").exists()
    assert listed() == [] and all(p.is_file() for p in split_files)


def test_a_missing_file_of_a_registered_model_refuses_to_spawn(rbee_env: Env,
                                                               split_files: list[Path]) -> None:
    r = run("rbee-hive", "models", "import", str(split_files[0]), "--copy", "--format", "json")
    assert r.returncode == 0, r
    Path(r.json()["shards"][1]["path"]).unlink()
    spawn = run("rbee-hive", "worker", "spawn", "cpu", "--model", "tiny", "--format", "json")
    assert spawn.returncode == 1, spawn
    err = error_of(spawn)
    assert err["code"] == "SHARD_MISSING" and "models rm tiny" in err["hint"]
    assert run("rbee-hive", "worker", "list", "--format", "json").json()["workers"] == []


def test_llama_cpp_loads_the_split_model_from_its_first_file(tmp_path: Path,
                                                            split_files: list[Path],
                                                            tiny_model: Path) -> None:
    import llama_cpp

    whole = llama_cpp.Llama(model_path=str(tiny_model), n_ctx=64, verbose=False)
    split = llama_cpp.Llama(model_path=str(split_files[0]), n_ctx=64, verbose=False)
    n_params = llama_cpp.llama_model_n_params
    assert n_params(split.model) == n_params(whole.model)
    assert split.tokenize(b"Hello") == whole.tokenize(b"Hello")
    # the first file alone is not the model: llama.cpp looks for the others by their names
    alone = tmp_path / NAMES[0]
    shutil.copy(split_files[0], alone)
    with pytest.raises(ValueError):
        llama_cpp.Llama(model_path=str(alone), n_ctx=64, verbose=False)


def test_a_worker_serves_the_split_model_and_says_what_the_whole_model_says(
        rbee_env: Env, split_files: list[Path], tiny_model: Path) -> None:
    assert run("rbee-hive", "models", "import", str(tiny_model), "--id", "whole").returncode == 0
    assert run("rbee-hive", "models", "import", str(split_files[0]), "--id",
               "split").returncode == 0
    texts = {}
    for model in ("whole", "split"):
        r = run("rbee", "infer", "-m", model, "-p", "Hello", "--max-tokens", "24",
                "--temperature", "0", "--format", "json")
        assert r.returncode == 0, r
        doc = r.json()
        texts[model] = doc["text"]
        workers = run("rbee-hive", "worker", "list", "--format", "json").json()["workers"]
        (worker,) = [w for w in workers if w["id"] == doc["worker"]["id"]]
        if model == "split":
            assert worker["model_path"].endswith("split.shards/split-00001-of-00003.gguf")
    assert texts["split"] == texts["whole"] and len(texts["whole"]) >= 20


def test_an_index_written_before_models_had_files_lists_each_model_as_one_file(
        rbee_env: Env, tiny_model: Path) -> None:
    import json

    assert run("rbee-hive", "models", "import", str(tiny_model), "--id", "tiny",
               "--copy").returncode == 0
    index = rbee_env.rbee_home / "models" / "index.json"
    doc = json.loads(index.read_text())
    del doc["models"]["tiny"]["shards"]  # as rbee wrote it before
    index.write_text(json.dumps(doc))
    (m,) = listed()
    assert m["shards"] == [{"path": m["path"], "size": m["size"], "sha256": m["sha256"]}]
    assert run("rbee-hive", "models", "verify", "tiny").returncode == 0
    gone = run("rbee-hive", "models", "rm", "tiny", "--format", "json")
    assert gone.returncode == 0 and gone.json()["freed_bytes"] == m["size"], gone
    assert not list(index.parent.glob("*.gguf"))


def test_placement_reads_every_files_header_for_a_model_no_host_has(
        rbee_env: Env, hub: HubServer, split_files: list[Path]) -> None:
    from gguf import GGUFReader

    from rbee_common.models import parse_source
    from rbee_keeper.probe import probe

    serve(hub, split_files)
    header = probe(parse_source(f"hf:{REPO}/{NAMES[1]}"))
    assert header is not None
    assert header["size"] == sum(p.stat().st_size for p in split_files)
    assert header["data_offset"] == sum(GGUFReader(p).data_offset for p in split_files)
    weights = sum(p.stat().st_size - GGUFReader(p).data_offset for p in split_files)
    assert header["size"] - header["data_offset"] == weights  # what the estimate takes
    assert header["context_length"] == GGUFReader(split_files[0]).fields[
        "llama.context_length"].contents()
    gets = hub.gets()
    assert sorted(g.path.rsplit("/", 1)[1] for g in gets) == NAMES  # one header read each
    assert all(g.range == "bytes=0-16777215" for g in gets)
    del hub.state.repos[REPO][NAMES[2]]  # a file gone: no estimate rather than a wrong one
    assert probe(parse_source(f"hf:{REPO}/{NAMES[0]}")) is None
