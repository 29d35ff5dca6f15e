"""The ``vllmtier`` workload's measuring side, run with an interpreter that
has vLLM (see :mod:`dynblock.bench.vllm_tier`): ``python -m
dynblock.bench.vllm_tier_run JSON`` prints one ``RESULT`` line of JSON.

Both tiers are made by vLLM's own ``SecondaryTierFactory`` over one primary
tier (a CPU array of chunks, as vLLM's CPU tier hands it over) and driven
through vLLM's secondary-tier interface: ``submit_store`` / ``submit_load``
of jobs of ``job_chunks`` chunks, then ``get_finished_jobs`` until every job
has reported. vLLM's tiering runs on GPU hosts only, so there is no engine
here: the offloading spec is the part of vLLM's config the tiers read."""

from __future__ import annotations

import json
import mmap
import os
import shutil
import sys
import time
import types
import warnings
from typing import Any, Dict, List

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
from vllm.v1.kv_offload.base import ReqContext, make_offload_key  # noqa: E402
from vllm.v1.kv_offload.tiering.base import TransferJob  # noqa: E402
from vllm.v1.kv_offload.tiering.factory import SecondaryTierFactory  # noqa: E402

from .common import cpu_seconds, drop_caches  # noqa: E402


def spec() -> Any:
    """The offloading spec's fields the tiers read (one chunk per block)."""
    cfg = types.SimpleNamespace(
        model=types.SimpleNamespace(name="bench-model", dtype="bfloat16"),
        cache=types.SimpleNamespace(tokens_per_hash=16),
        parallel=types.SimpleNamespace(tp_size=1, pp_size=1, pcp_size=1, dcp_size=1, rank=0,
                                       world_size=1, is_parallelism_agnostic=True),
        groups=[types.SimpleNamespace(tokens_per_block=16, layer_names=["l0"])],
        canonical_layout=False, kv_cache_layout=None, replicated_layout=False)
    return types.SimpleNamespace(config=cfg, blocks_per_chunk=1,
                                 kv_events_config=types.SimpleNamespace(
                                     enable_kv_cache_events=False))


def _wait(tier: Any, ids: List[int]) -> None:
    left = set(ids)
    deadline = time.monotonic() + 600
    while left:
        for r in tier.get_finished_jobs():
            if not r.success:
                raise RuntimeError(f"job {r.job_id} failed: {r}")
            left.discard(r.job_id)
        if time.monotonic() > deadline:
            raise RuntimeError(f"jobs {sorted(left)[:5]} never finished")
        time.sleep(0.0005)


def run(args: Dict[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {"cases": [], "notes": []}
    root = os.path.join(args["dir"], f".dynblock-bench-vllm-tier-{os.getpid()}")
    jc = int(args["job_chunks"])
    for cb in args["chunk_sizes"]:
        n = max(jc, int(args["bytes"]) // cb // jc * jc)
        # Memory like vLLM's own primary tier: a shared mapping (its SharedOffloadRegion maps a
        # /dev/shm file), page-aligned for O_DIRECT and on the small pages shared memory gets
        # (shmem_enabled): pinning them per I/O costs what it costs in a real engine.
        region = mmap.mmap(-1, 2 * n * cb, flags=mmap.MAP_SHARED)
        primary = np.frombuffer(region, dtype=np.uint8).reshape(2 * n, cb)
        primary[n:] = 0
        primary[:n] = np.random.default_rng(cb).integers(0, 256, (n, cb), dtype=np.uint8)
        want = primary[:n].copy()
        view = memoryview(primary)  # type: ignore[arg-type]
        results: Dict[str, Dict[str, List[float]]] = {}
        for rep in range(int(args["repeat"])):
            for impl in ("dynblock", "dynblock-no-checksums", "dynblock-zero-filled", "fs"):
                shutil.rmtree(root, ignore_errors=True)
                os.makedirs(root)
                if impl.startswith("dynblock"):
                    conf = {"type": "DynblockTier", "module_path": "dynblock.vllm",
                            "host_blocks": 0, "disk_blocks": n, "disk_dir": root,
                            "numa_node": None, "pin": False,
                            "checksums": impl != "dynblock-no-checksums"}
                    if impl == "dynblock-zero-filled":
                        conf["preallocate"] = "zero"
                else:
                    conf = {"type": "fs", "root_dir": root}
                t0 = time.perf_counter()
                tier = SecondaryTierFactory.create_secondary_tier(conf, view, spec())
                opened = results.setdefault(f"{impl}/open", {"values": [], "cpu": []})
                opened["values"].append(time.perf_counter() - t0)
                try:
                    ctx = ReqContext(req_id=f"r{rep}")
                    keys = [make_offload_key(int(rep * 10**9 + cb + i).to_bytes(32, "little"), 0)
                            for i in range(n)]
                    for op, rows in (("store", range(n)), ("load-cold", range(n, 2 * n))):
                        if op == "load-cold":
                            primary[n:] = 0
                            drop_caches()
                        jobs = []
                        c0, t0 = cpu_seconds(), time.perf_counter()
                        for j, i in enumerate(range(0, n, jc)):
                            job = TransferJob(job_id=rep * 10**6 + j, keys=keys[i:i + jc],
                                              chunk_ids=np.arange(rows[i], rows[i] + jc),
                                              is_promotion=op != "store", req_context=ctx)
                            (tier.submit_store if op == "store" else tier.submit_load)(job)
                            jobs.append(job.job_id)
                        _wait(tier, jobs)
                        t, c = time.perf_counter() - t0, cpu_seconds() - c0
                        r = results.setdefault(f"{impl}/{op}", {"values": [], "cpu": []})
                        r["values"].append(n * cb / t / 2**30)
                        r["cpu"].append(c / (n * cb / 2**30))  # CPU s/GiB
                    if not np.array_equal(primary[n:], want):
                        raise RuntimeError(f"{impl}: the loaded chunks differ from the stored ones")
                finally:
                    tier.shutdown()
                    shutil.rmtree(root, ignore_errors=True)
        out["cases"].append({"chunk_bytes": cb, "chunks": n, "results": results})
    return out


def main() -> None:
    print("RESULT " + json.dumps(run(json.loads(sys.argv[1]))), flush=True)


if __name__ == "__main__":
    main()
