"""Downloads: `rbee-hive models download` throughput against a plain HTTP fetch of the same
file from the same loopback server, for https: and hf: sources; and how many bytes a resumed
download transfers again after a connection dropped halfway.

    python bench/download.py [--size-mb 256]
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from _common import Sandbox, emit, parser, ratio

from tests.hubserver import HubServer
from tests.tinymodel import write_tiny_model

MiB = 1024 * 1024


def plain_fetch(url: str, to: Path | None = None) -> float:
    """GET the file; with `to`, also write it and fsync, as any safe downloader must."""
    import httpx

    t0 = time.perf_counter()
    with httpx.stream("GET", url, timeout=60) as r:
        if to is None:
            for _ in r.iter_raw():
                pass
        else:
            with open(to, "wb") as f:
                for chunk in r.iter_raw():
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
    return time.perf_counter() - t0


def rbee_fetch(box: Sandbox, ref: str, **env: str) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    doc = box.json("rbee-hive", "models", "download", ref, **env)
    return time.perf_counter() - t0, doc


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--size-mb", type=int, default=256)
    args = p.parse_args()
    size = (16 if args.quick else args.size_mb) * MiB
    hub = HubServer().start()
    try:
        with Sandbox() as box:
            head = write_tiny_model(box.root / "head.gguf").read_bytes()
            body = head + os.urandom(size - len(head))
            hub.add_file("big.gguf", body)
            hub.add_repo_file("bench/Big-GGUF", "big.gguf", body)
            url = f"{hub.url}/files/big.gguf"
            base = plain_fetch(url)
            to_disk = plain_fetch(url, box.root / "plain.gguf")
            t_url, _ = rbee_fetch(box, url)
            box.run("rbee-hive", "models", "rm", "big")
            t_hf, _ = rbee_fetch(box, "hf:bench/Big-GGUF/big.gguf", HF_ENDPOINT=hub.url)
            box.run("rbee-hive", "models", "rm", "big")
            hub.drop_next(after_bytes=size // 2)
            failed = box.run("rbee-hive", "models", "download", url, "--format", "json",
                             check=False, RBEE_DOWNLOAD_RETRIES="0")
            kept = (box.root / "rbee-home" / "downloads" / "big.part").stat().st_size
            _, resumed = rbee_fetch(box, url)
    finally:
        hub.stop()
    mb = size / MiB
    emit({"benchmark": "download", "size_bytes": size, "results": {
        "plain_http_fetch_mb_s": round(mb / base, 1),
        "plain_fetch_to_disk_mb_s": round(mb / to_disk, 1),
        "rbee_https_mb_s": round(mb / t_url, 1),
        "rbee_hf_mb_s": round(mb / t_hf, 1),
        "rbee_https_vs_plain": ratio(base, t_url),
        "rbee_hf_vs_plain": ratio(base, t_hf),
        "rbee_https_vs_plain_to_disk": ratio(to_disk, t_url),
        "resume": {"first_run_exit": failed.returncode, "kept_bytes": kept,
                   "transferred_on_resume": resumed["transferred_bytes"],
                   "retransferred_bytes": resumed["transferred_bytes"] - (size - kept)},
    }}, args.out)


if __name__ == "__main__":
    main()
