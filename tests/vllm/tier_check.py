"""Checks dynblock.vllm.DynblockTier against the installed vLLM's secondary-tier
interface, with a primary tier made of a CPU tensor (vLLM's tiering runs on GPU
hosts only, so no engine here). Run by tests/test_vllm.py in the vLLM
environment: ``python tier_check.py WORKDIR``; exits non-zero on the first
failed check and prints ``TIER OK <json>`` at the end."""

from __future__ import annotations

import json
import os
import sys
import time
import types

import numpy as np
import torch
from vllm.v1.kv_offload.base import LookupResult, ReqContext, make_offload_key
from vllm.v1.kv_offload.tiering.base import SecondaryTierManager, TransferJob
from vllm.v1.kv_offload.tiering.factory import SecondaryTierFactory

CHUNK = 4096


def wait_jobs(tier: SecondaryTierManager, ids: set) -> dict:
    out: dict = {}
    deadline = time.monotonic() + 60
    while ids - set(out):
        assert time.monotonic() < deadline, f"jobs {ids - set(out)} never finished"
        for r in tier.get_finished_jobs():
            out[r.job_id] = r
        time.sleep(0.001)
    return out


def check_metrics(tier: SecondaryTierManager) -> dict:
    """The tier's stats through vLLM's own offloading metrics: the definitions the tiering spec
    collects from its secondary tiers, vLLM's OffloadPromMetrics, a real prometheus_client
    registry. Returns the dynblock samples of a scrape."""
    from prometheus_client import REGISTRY, Counter, Gauge, Histogram, generate_latest
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import OffloadPromMetrics
    from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec

    extra = {"spec_name": "TieringOffloadingSpec", "cpu_bytes_to_use": 1 << 20,
             "secondary_tiers": [{"type": "DynblockTier", "module_path": "dynblock.vllm"}]}
    defs = TieringOffloadingSpec.build_metric_definitions(extra)
    assert "dynblock_hits_total" in defs and defs["dynblock_hits_total"].labelnames == ("tier",)
    cfg = types.SimpleNamespace(kv_transfer_config=types.SimpleNamespace(
        kv_connector_extra_config=extra))
    prom = OffloadPromMetrics(cfg, {Counter: Counter, Gauge: Gauge, Histogram: Histogram},
                              ["model_name", "engine"], {0: ["tiny", "0"]})
    st = tier.get_stats()
    assert st is not None and not st.is_empty()
    prom.observe(st.data, 0)
    again = tier.get_stats()  # counters moved by nothing since: only the gauges again
    assert again is not None and {again.data["types"][k] for k in again.data["data"]} == {"gauge"}
    out = {}
    for line in generate_latest(REGISTRY).decode().splitlines():
        if line.startswith("dynblock_") and "_created" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def make(primary: torch.Tensor, spec: object, **cfg: object) -> SecondaryTierManager:
    view = memoryview(primary.numpy())
    tier = SecondaryTierFactory.create_secondary_tier(
        {"type": "DynblockTier", "module_path": "dynblock.vllm", **cfg}, view, spec)
    assert type(tier).__name__ == "DynblockTier" and tier.block_size_bytes == primary.shape[1]
    return tier


def main() -> None:
    work = sys.argv[1]
    rng = np.random.default_rng(0)
    primary = torch.zeros((64, CHUNK), dtype=torch.uint8)
    spec = types.SimpleNamespace(config=None, kv_events_config=types.SimpleNamespace(
        enable_kv_cache_events=True))
    ctx = ReqContext(req_id="r1")
    store = os.path.join(work, "tier.bin")
    tier = make(primary, spec, host_blocks=4, disk_blocks=64, disk_path=store, persist=True,
                numa_node=None, pin=False)
    # The primary tier's memory is registered with the disk engine (small pages), or says why not.
    disk = tier.kv.stats()["disk"]
    assert (disk["registered_bytes"] == primary.numel()
            or disk["engine"] != "io_uring" or "huge pages" in (disk["registration_skipped"] or "")
            or "refused" in (disk["registration_skipped"] or "")), disk
    keys = [make_offload_key(bytes(rng.integers(0, 256, 32, dtype=np.uint8)), 0) for _ in range(12)]
    primary[:12] = torch.from_numpy(rng.integers(0, 256, (12, CHUNK), dtype=np.uint8))
    want = primary[:12].clone()

    # store: 12 chunks from rows 0..11 (more than the 4 host slots: evictions go to disk)
    tier.submit_store(TransferJob(job_id=1, keys=keys, chunk_ids=np.arange(12),
                                  is_promotion=False, req_context=ctx))
    tier.drain_jobs()
    assert not tier.has_pending_work()
    r = wait_jobs(tier, {1})[1]
    assert r.success and r.transfer_bytes == 12 * CHUNK, r
    assert all(tier.lookup(k, ctx) == LookupResult.HIT for k in keys)
    # KV events: replayed in order, they say which tier holds which chunk (4 host slots)
    where: dict = {}
    for e in tier.take_events():
        (k,) = e.keys
        assert e.ownership == "DynblockTier" and e.medium.name in ("CPU", "STORAGE")
        tiers = where.setdefault(bytes(k), set())
        if e.removed:
            tiers.remove(e.medium.name)
        else:
            tiers.add(e.medium.name)
    assert set(where) == {bytes(k) for k in keys} and all(where.values()), where
    assert sum("CPU" in t for t in where.values()) == 4
    other = make_offload_key(b"\x01" * 32, 0)
    assert tier.lookup(other, ctx) == LookupResult.MISS

    # load: into other rows, byte-exact (from host and disk slots)
    primary[20:32] = 0
    tier.submit_load(TransferJob(job_id=2, keys=keys, chunk_ids=np.arange(20, 32),
                                 is_promotion=True, req_context=ctx))
    r = wait_jobs(tier, {2})[2]
    assert r.success and r.successful_keys is None, r
    assert torch.equal(primary[20:32], want)

    # a load whose second chunk is missing: the first and the third arrive, both reported as
    # the successful keys (the one after the missing chunk is not recomputed for nothing)
    tier.submit_load(TransferJob(job_id=3, keys=[keys[0], other, keys[2]],
                                 chunk_ids=np.array([40, 41, 42]), is_promotion=True,
                                 req_context=ctx))
    r = wait_jobs(tier, {3})[3]
    assert not r.success and list(r.successful_keys) == [keys[0], keys[2]], r
    assert torch.equal(primary[40], want[0]) and torch.equal(primary[42], want[2])

    # a store job that fails (a chunk id past the primary tier) fails alone
    tier.submit_store(TransferJob(job_id=4, keys=[other], chunk_ids=np.array([64]),
                                  is_promotion=False, req_context=ctx))
    r = wait_jobs(tier, {4})[4]
    assert not r.success
    assert tier.lookup(other, ctx) == LookupResult.MISS and tier.stats()["failed_jobs"] == 1

    # touch keeps chunks from eviction, in the host tier's LRU
    tier.touch([keys[0]], ctx)
    assert tier.kv.lru_order()[0][-1] in tier._keys([keys[0]])
    stats = tier.stats()
    metrics = check_metrics(tier)

    # a request whose kv_transfer_params name a namespace keeps its chunks there: the same key
    # with other bytes, apart from the shared namespace's; a bad name stores and finds nothing
    t1 = ReqContext(req_id="r2", kv_transfer_params={"dynblock_namespace": "t1"})
    bad = ReqContext(req_id="r3", kv_transfer_params={"dynblock_namespace": 5})
    primary[50] = torch.from_numpy(rng.integers(0, 256, CHUNK, dtype=np.uint8))
    mine = primary[50].clone()
    assert tier.lookup(keys[1], t1) == LookupResult.MISS
    tier.submit_store(TransferJob(job_id=6, keys=[keys[1]], chunk_ids=np.array([50]),
                                  is_promotion=False, req_context=t1))
    tier.submit_store(TransferJob(job_id=7, keys=[keys[3]], chunk_ids=np.array([50]),
                                  is_promotion=False, req_context=bad))
    done = wait_jobs(tier, {6, 7})
    assert done[6].success and not done[7].success
    assert tier.lookup(keys[1], t1) == LookupResult.HIT and tier.lookup(keys[3], bad) == LookupResult.MISS
    assert tier.lookup(keys[4], t1) == LookupResult.MISS  # the shared namespace's chunk
    part = tier.kv.stats(namespace="t1")
    assert part["host_blocks_used"] + part["disk_blocks_used"] == 1, part
    tier.submit_load(TransferJob(job_id=8, keys=[keys[1]], chunk_ids=np.array([51]),
                                 is_promotion=True, req_context=t1))
    tier.submit_load(TransferJob(job_id=9, keys=[keys[1]], chunk_ids=np.array([52]),
                                 is_promotion=True, req_context=ctx))
    done = wait_jobs(tier, {8, 9})
    assert done[8].success and done[9].success
    assert torch.equal(primary[51], mine) and torch.equal(primary[52], want[1])
    tier.shutdown()

    # a restarted tier on the same persistent store serves every chunk
    primary2 = torch.zeros((64, CHUNK), dtype=torch.uint8)
    tier2 = make(primary2, spec, host_blocks=4, disk_blocks=64, disk_path=store, persist=True,
                 numa_node=None, pin=False)
    assert all(tier2.lookup(k, ctx) == LookupResult.HIT for k in keys)
    tier2.submit_load(TransferJob(job_id=5, keys=keys, chunk_ids=np.arange(12),
                                  is_promotion=True, req_context=ctx))
    assert wait_jobs(tier2, {5})[5].success and torch.equal(primary2[:12], want)
    tier2.shutdown()

    # another model (here: another fingerprint) never sees these chunks
    spec2 = types.SimpleNamespace(config=types.SimpleNamespace(
        model=types.SimpleNamespace(name="other-model", dtype="bfloat16"), groups=(),
        cache=None, parallel=None, kv_cache_layout=None))
    tier3 = make(primary2, spec2, host_blocks=4, disk_blocks=64, disk_path=store, persist=True,
                 numa_node=None, pin=False)
    assert all(tier3.lookup(k, ctx) == LookupResult.MISS for k in keys)
    tier3.shutdown()

    # bad configuration is refused with the key's name
    try:
        make(primary2, spec, host_blocks=4, numa_node=None, pin=False, colour="blue")
    except ValueError as e:
        assert "colour" in str(e), e
    else:
        raise AssertionError("an unknown tier option was accepted")
    print("TIER OK " + json.dumps({**{k: v for k, v in stats.items() if k != "store"},
                                   "metrics": metrics}), flush=True)


if __name__ == "__main__":
    main()
