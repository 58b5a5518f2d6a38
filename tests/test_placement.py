"""Placement and the fit rule on fake inventories, in-process: decisions without processes."""

from __future__ import annotations

from typing import Any

import pytest

from rbee_common.errors import InsufficientRam, InsufficientVram
from rbee_common.estimate import OVERHEAD_BYTES, estimate
from rbee_common.fit import Room, default_ctx, fit, promised_bytes, room_of
from rbee_keeper.errors import HostUnreachable, NoPlacement
from rbee_keeper.placement import Constraints, ModelNeed, place

GiB = 1024**3
MiB = 1024**2


def host(*devices: tuple[str, int, int], models: tuple[str, ...] = (),
         workers: tuple[dict[str, Any], ...] = (), reserve: int = 0,
         cuda: bool = True) -> dict[str, Any]:
    """A `rbee-hive status` document: devices as (backend, index, free bytes)."""
    have = {b for b, _, _ in devices}
    return {
        "schema": "rbee.hive.status/v1",
        "reserve_bytes": reserve,
        "backends": [{"name": "cpu", "available": True, "reason": None},
                     {"name": "cuda", "available": cuda and "cuda" in have,
                      "reason": None if cuda and "cuda" in have else "NVML: no driver"},
                     {"name": "metal", "available": False, "reason": "not a Mac"}],
        "devices": [{"backend": b, "index": i, "memory_free": free, "memory_total": free}
                    for b, i, free in devices],
        "models": [{"id": m, "source": f"hf:o/r/{m}.gguf", "sha256": None} for m in models],
        "workers": list(workers),
    }


def need(size: int, model: str = "m", kv_per_token: int = 0,
         context_length: int | None = 2048) -> ModelNeed:
    return ModelNeed(model, f"hf:o/r/{model}.gguf", size=size, data_offset=0,
                     kv_per_token=kv_per_token, context_length=context_length)


def worker(wid: str, model: str, backend: str = "cpu", device: int = 0,
           state: str = "ready", **extra: Any) -> dict[str, Any]:
    return {"id": wid, "model": model, "backend": backend, "device": device, "state": state,
            "ctx": 2048, **extra}


# the fit rule

def test_default_context_is_the_smaller_of_4096_and_what_it_was_trained_on() -> None:
    assert default_ctx(None) == 4096
    assert default_ctx(2048) == 2048
    assert default_ctx(131072) == 4096


def test_fit_compares_the_estimate_with_free_less_reserve_less_promised() -> None:
    est = estimate(1 * GiB, 0, 1024, 4096)  # 1 GiB weights + 8 MiB KV + overhead
    assert est.total_bytes == GiB + 8 * MiB + OVERHEAD_BYTES
    room = Room("cuda", 0, free=2 * GiB, reserve=256 * MiB, promised=256 * MiB)
    assert room.available == 2 * GiB - 512 * MiB
    assert fit(est, [room]).ok
    tight = Room("cuda", 0, free=2 * GiB, reserve=256 * MiB, promised=600 * MiB)
    verdict = fit(est, [tight])
    assert not verdict.ok and verdict.gpu
    assert "KV cache at ctx 4096" in verdict.reason()


def test_a_ram_cap_counts_what_running_workers_hold() -> None:
    est = estimate(1 * GiB, 0, 0, 4096)
    # 20 GiB free, but rbee may use 2 GiB here and its running worker holds 1.5 of them
    workers = [worker("a", "m", "cpu", 0, "ready", estimate_bytes=1536 * MiB)]
    room = room_of({"backend": "cpu", "index": 0, "memory_free": 20 * GiB,
                    "memory_limit": 2 * GiB}, workers, reserve=0)
    assert room.held == 1536 * MiB and room.available == 512 * MiB
    assert not fit(est, [room]).ok
    assert "rbee may use 2.0 GiB here" in room.describe()
    uncapped = room_of({"backend": "cpu", "index": 0, "memory_free": 20 * GiB}, workers, 0)
    assert fit(est, [uncapped]).ok


def test_promised_memory_counts_only_loading_workers_on_that_device() -> None:
    workers = [worker("a", "m", "cuda", 0, "loading", estimate_bytes=3 * GiB),
               worker("b", "m", "cuda", 0, "ready", estimate_bytes=5 * GiB),
               worker("c", "m", "cuda", 1, "loading", estimate_bytes=7 * GiB),
               worker("d", "m", "cuda", 0, "loading", estimate_bytes=4 * GiB, devices=[0, 1],
                      device_bytes=[3 * GiB, 1 * GiB])]
    assert promised_bytes(workers, "cuda", 0) == 6 * GiB
    assert promised_bytes(workers, "cuda", 1) == 8 * GiB
    assert promised_bytes(workers, "cpu", 0) == 0
    room = room_of({"backend": "cuda", "index": 1, "memory_free": 24 * GiB}, workers,
                   reserve=GiB)
    assert room.available == 24 * GiB - GiB - 8 * GiB


def test_a_split_gives_each_card_a_share_in_proportion_to_what_it_has() -> None:
    est = estimate(28 * GiB, 0, 0, 4096)
    rooms = [Room("cuda", 0, 24 * GiB, 0), Room("cuda", 1, 8 * GiB, 0)]
    verdict = fit(est, rooms)
    assert verdict.ok
    assert verdict.tensor_split == (0.75, 0.25)
    assert verdict.shares[0] == 21 * GiB + OVERHEAD_BYTES
    assert verdict.shares[1] == 7 * GiB + OVERHEAD_BYTES
    assert not fit(estimate(32 * GiB, 0, 0, 4096), rooms).ok  # every card pays its overhead


# placement

def test_the_model_fits_on_the_one_host() -> None:
    p = place({"a": host(("cpu", 0, 16 * GiB))}, need(GiB), Constraints())
    assert (p.chosen.host, p.chosen.backend, p.chosen.device) == ("a", "cpu", 0)
    assert p.ctx == 2048 and p.rejected == []
    assert p.to_dict()["chosen"]["devices"] == [0]


def test_nothing_fits_names_every_hosts_figures() -> None:
    statuses = {"a": host(("cpu", 0, 2 * GiB)), "b": host(("cpu", 0, 3 * GiB))}
    with pytest.raises(InsufficientRam) as e:
        place(statuses, need(8 * GiB), Constraints())
    rejected = e.value.details["rejected"]
    assert [r["host"] for r in rejected] == ["a", "b", "a+b"]  # alone, then together
    assert all("needs 8.2 GiB (8.0 GiB weights" in r["reason"] for r in rejected[:2])
    assert "2.0 GiB available" in rejected[0]["reason"]
    assert "split: needs 8.2 GiB" in rejected[2]["reason"]
    assert "5.0 GiB available on 2 hosts together" in rejected[2]["reason"]


def test_an_idle_worker_beats_more_free_memory_elsewhere() -> None:
    statuses = {"big": host(("cpu", 0, 64 * GiB)),
                "warm": host(("cpu", 0, 2 * GiB), models=("m",), workers=(worker("w1", "m"),))}
    p = place(statuses, need(4 * GiB), Constraints())
    assert p.chosen.host == "warm" and p.chosen.worker is not None
    assert p.chosen.worker["id"] == "w1"  # it fits there already: no memory check
    assert "ranked lower" in p.rejected[0].reason


def test_a_busy_or_loading_worker_is_not_taken_as_idle() -> None:
    statuses = {"a": host(("cpu", 0, 32 * GiB), workers=(worker("w1", "m", state="busy"),))}
    assert place(statuses, need(GiB), Constraints()).chosen.worker is None


def test_a_gpu_beats_the_cpu_even_with_less_memory() -> None:
    statuses = {"a": host(("cpu", 0, 64 * GiB), ("cuda", 0, 8 * GiB))}
    p = place(statuses, need(4 * GiB), Constraints())
    assert (p.chosen.backend, p.chosen.device) == ("cuda", 0)


def test_a_host_that_has_the_file_beats_one_with_more_memory() -> None:
    statuses = {"empty": host(("cpu", 0, 64 * GiB)), "has": host(("cpu", 0, 8 * GiB),
                                                                 models=("m",))}
    assert place(statuses, need(GiB), Constraints()).chosen.host == "has"


def test_a_host_that_is_down_is_rejected_and_the_others_still_place() -> None:
    statuses = {"down": HostUnreachable("down: connection refused"),
                "up": host(("cpu", 0, 8 * GiB))}
    p = place(statuses, need(GiB), Constraints())
    assert p.chosen.host == "up"
    assert p.rejected[0].host == "down" and "HOST_UNREACHABLE" in p.rejected[0].reason


def test_only_hosts_that_are_down_is_no_placement() -> None:
    with pytest.raises(NoPlacement):
        place({"down": HostUnreachable("down")}, need(GiB), Constraints())


def test_backend_device_and_ctx_constrain_the_choice() -> None:
    statuses = {"a": host(("cpu", 0, 64 * GiB), ("cuda", 0, 8 * GiB), ("cuda", 1, 12 * GiB))}
    p = place(statuses, need(GiB), Constraints(backend="cpu"))
    assert p.chosen.backend == "cpu"
    p = place(statuses, need(GiB), Constraints(backend="cuda", device=0))
    assert (p.chosen.backend, p.chosen.device) == ("cuda", 0)
    assert any("not the requested device" in r.reason for r in p.rejected)
    p = place(statuses, need(GiB, context_length=32768), Constraints(ctx=16384))
    assert p.ctx == 16384
    with pytest.raises(NoPlacement, match="metal unavailable"):
        place(statuses, need(GiB), Constraints(backend="metal"))


def test_a_model_only_some_host_registered_goes_there() -> None:
    imported = ModelNeed("mine", "", size=GiB, data_offset=0, downloadable=False)
    statuses = {"a": host(("cpu", 0, 64 * GiB)),
                "b": host(("cpu", 0, 8 * GiB), models=("mine",))}
    statuses["b"]["models"][0]["source"] = "file:/somewhere/mine.gguf"
    p = place(statuses, imported, Constraints())
    assert p.chosen.host == "b"
    assert any(r.host == "a" and "has no model" in r.reason for r in p.rejected)


def test_workers_still_loading_hold_their_promise() -> None:
    loading = worker("w1", "other", state="loading", estimate_bytes=6 * GiB)
    statuses = {"a": host(("cpu", 0, 8 * GiB), workers=(loading,))}
    with pytest.raises(InsufficientRam, match="needs"):
        place(statuses, need(3 * GiB), Constraints())


# several GPUs of one host

def test_two_24_gb_cards_hold_a_30_gb_model_that_neither_holds_alone() -> None:
    statuses = {"ws": host(("cpu", 0, 16 * GiB), ("cuda", 0, 24 * GiB), ("cuda", 1, 24 * GiB),
                           reserve=512 * MiB)}
    p = place(statuses, need(30 * GiB), Constraints())
    assert (p.chosen.backend, p.chosen.devices) == ("cuda", (0, 1))
    assert p.chosen.tensor_split == (0.5, 0.5)
    assert "2 GPUs" in p.chosen.why()
    chosen = p.to_dict()["chosen"]
    assert chosen["devices"] == [0, 1] and chosen["tensor_split"] == [0.5, 0.5]
    reasons = {(r.backend, r.device): r.reason for r in p.rejected}
    assert "needs 30.2 GiB" in reasons[("cuda", 0)]  # each card alone, with its figures


def test_a_24_and_an_8_gb_card_split_in_proportion() -> None:
    statuses = {"ws": host(("cuda", 0, 24 * GiB), ("cuda", 1, 8 * GiB))}
    p = place(statuses, need(28 * GiB), Constraints())
    assert p.chosen.devices == (0, 1)
    assert p.chosen.tensor_split == (0.75, 0.25)


def test_a_card_that_fits_alone_is_used_alone() -> None:
    statuses = {"ws": host(("cuda", 0, 24 * GiB), ("cuda", 1, 24 * GiB))}
    p = place(statuses, need(20 * GiB), Constraints())
    assert len(p.chosen.devices) == 1


def test_one_busy_card_leaves_no_room_for_a_split() -> None:
    busy = worker("w1", "other", "cuda", 1, "loading", estimate_bytes=22 * GiB)
    statuses = {"ws": host(("cuda", 0, 24 * GiB), ("cuda", 1, 24 * GiB), workers=(busy,))}
    with pytest.raises(InsufficientVram) as e:
        place(statuses, need(30 * GiB), Constraints())
    assert any(r["devices"] == [0, 1] or r["device"] == 0 for r in e.value.details["rejected"])
    # a model that fits the free card alone goes there
    p = place(statuses, need(20 * GiB), Constraints())
    assert p.chosen.devices == (0,)


def test_a_busy_card_is_left_out_of_the_split_and_the_free_ones_share() -> None:
    busy = worker("w1", "other", "cuda", 2, "loading", estimate_bytes=24 * GiB)
    statuses = {"ws": host(("cuda", 0, 24 * GiB), ("cuda", 1, 24 * GiB), ("cuda", 2, 24 * GiB),
                           workers=(busy,))}
    p = place(statuses, need(30 * GiB), Constraints())
    assert p.chosen.devices == (0, 1)


def test_pinning_two_devices_by_hand_splits_even_when_one_would_do() -> None:
    statuses = {"ws": host(("cuda", 0, 24 * GiB), ("cuda", 1, 24 * GiB))}
    p = place(statuses, need(4 * GiB), Constraints(device=(0, 1)))
    assert p.chosen.devices == (0, 1)


# one model across hosts (llama.cpp RPC)

def test_a_model_no_host_holds_alone_is_split_across_the_fewest_hosts() -> None:
    # 20 GiB of weights: no single host (16, 12, 6 GiB) holds it; 16 + 12 do
    statuses = {"gaming": host(("cuda", 0, 16 * GiB)), "work": host(("cuda", 0, 12 * GiB)),
                "old": host(("cpu", 0, 6 * GiB), models=("m",))}
    p = place(statuses, need(20 * GiB), Constraints())
    split = p.chosen.split
    assert split is not None and sorted(split.hosts) == ["gaming", "work"]
    assert split.primary == "gaming" and p.chosen.host == "gaming"  # most memory of the two
    assert [(s.host, s.role) for s in split.shares] == [("work", "lender"),
                                                        ("gaming", "worker")]
    assert p.chosen.tensor_split == split.tensor_split
    assert abs(sum(split.tensor_split) - 1) < 1e-3
    assert split.tensor_split[1] > split.tensor_split[0]  # in proportion to free memory
    est = p.estimate
    assert est is not None
    for s in split.shares:  # the fit rule holds on every device
        assert s.available is not None and s.share_bytes <= s.available
    assert sum(s.share_bytes for s in split.shares) >= est.weights_bytes + est.kv_bytes
    doc = p.to_dict()["chosen"]
    assert doc["split"]["primary"] == "gaming" and doc["split"]["hosts"] == ["gaming", "work"]
    assert [d["role"] for d in doc["split"]["devices"]] == ["lender", "worker"]
    assert "split across 2 hosts" in doc["reason"]
    # each host's own rejection says why it could not hold the model alone
    assert {r.host for r in p.rejected if r.memory} >= {"gaming", "work", "old"}


def test_a_model_that_fits_one_host_is_never_split() -> None:
    statuses = {"a": host(("cuda", 0, 24 * GiB)), "b": host(("cuda", 0, 24 * GiB))}
    p = place(statuses, need(10 * GiB), Constraints())
    assert p.chosen.split is None and p.to_dict()["chosen"]["split"] is None


def test_a_split_prefers_fewer_network_devices_then_a_primary_with_the_model() -> None:
    # a: two 8 GiB cards; b: one 16 GiB card; c: one 16 GiB card with the model.
    # 2 hosts are enough either way; b+c puts one device across the network, as do a+b/a+c
    # with a as lender? no: a lends two devices. So b+c wins, and c (it has the file) runs it.
    statuses = {"a": host(("cuda", 0, 8 * GiB), ("cuda", 1, 8 * GiB)),
                "b": host(("cuda", 0, 16 * GiB)), "c": host(("cuda", 0, 16 * GiB), models=("m",))}
    split = place(statuses, need(20 * GiB), Constraints()).chosen.split
    assert split is not None
    assert split.primary == "c" and split.hosts == ["c", "b"]
    assert len(split.lenders) == 1


def test_split_asked_for_uses_exactly_those_hosts_the_first_running_the_worker() -> None:
    statuses = {"a": host(("cpu", 0, 8 * GiB)), "b": host(("cpu", 0, 8 * GiB)),
                "c": host(("cpu", 0, 64 * GiB))}
    p = place(statuses, need(1 * GiB), Constraints(split=("b", "a")))
    split = p.chosen.split
    assert split is not None and split.primary == "b" and split.hosts == ["b", "a"]
    assert p.chosen.host == "b" and p.chosen.backend == "cpu"


def test_a_split_that_does_not_fit_names_the_figures() -> None:
    statuses = {"a": host(("cuda", 0, 8 * GiB)), "b": host(("cuda", 0, 8 * GiB))}
    with pytest.raises(InsufficientVram) as e:
        place(statuses, need(30 * GiB), Constraints())
    assert "split: needs" in e.value.message and "on 2 hosts together" in e.value.message
    with pytest.raises(InsufficientVram) as forced:
        place(statuses, need(30 * GiB), Constraints(split=("a", "b")))
    assert "split: needs" in forced.value.message


def test_a_host_without_rpc_is_left_out_of_a_split_with_its_reason() -> None:
    no_rpc = host(("cuda", 0, 16 * GiB))
    no_rpc["rpc"] = {"available": False, "reason": "built without GGML_RPC"}
    statuses = {"a": host(("cuda", 0, 16 * GiB)), "b": no_rpc, "c": host(("cpu", 0, 16 * GiB))}
    p = place(statuses, need(20 * GiB), Constraints())
    assert p.chosen.split is not None and "b" not in p.chosen.split.hosts
    assert any(r.host == "b" and "built without GGML_RPC" in r.reason for r in p.rejected)


def test_the_queen_does_not_split_until_it_can_hold_the_tunnels() -> None:
    statuses = {"a": host(("cuda", 0, 16 * GiB)), "b": host(("cuda", 0, 16 * GiB))}
    with pytest.raises(InsufficientVram):
        place(statuses, need(20 * GiB), Constraints(auto_split=False))


def test_memory_a_host_lends_over_rpc_counts_against_its_cap() -> None:
    capped = host(("cpu", 0, 64 * GiB))
    capped["devices"][0]["memory_limit"] = 4 * GiB
    est = need(2 * GiB)
    assert place({"a": capped}, est, Constraints()).chosen.host == "a"
    capped["lenders"] = [{"id": "rpc-cpu0-1", "backend": "cpu", "index": 0, "state": "busy",
                          "memory_bytes": 3 * GiB}]
    with pytest.raises(InsufficientRam) as e:  # 3 of its 4 GiB are lent to another host
        place({"a": capped}, est, Constraints())
    assert "1.0 GiB available" in e.value.message
    capped["lenders"][0]["state"] = "dead"  # a dead lender holds nothing
    assert place({"a": capped}, est, Constraints()).chosen.host == "a"


def test_hosts_with_no_room_at_all_are_short_of_memory_not_unplaceable() -> None:
    # every device is below the overhead a device pays to join a split: no split is
    # considered, and the verdict is the memory one, with each host's figures
    statuses = {"a": host(("cpu", 0, 2 * GiB), reserve=2 * GiB - MiB),
                "b": host(("cpu", 0, 3 * GiB), reserve=3 * GiB - MiB)}
    with pytest.raises(InsufficientRam) as e:
        place(statuses, need(GiB), Constraints())
    assert [r["host"] for r in e.value.details["rejected"]] == ["a", "b"]
    with pytest.raises(InsufficientRam) as forced:  # asked for: each host says why
        place(statuses, need(GiB), Constraints(split=("a", "b")))
    assert [r["reason"] for r in forced.value.details["rejected"]] == \
        ["split: no device with room to lend"] * 2
