"""``python -m dynblock.bench``: throughput of dynblock's tiers side by side
with what users would otherwise use, measured in one run.

Workloads (``--workloads``, comma-separated; default: all but ``vllm`` and ``remote``):

- ``disk``: write and read of N blocks per block size, random (and with
  ``--patterns random,sequential`` sequential) slot order, O_DIRECT and
  buffered (cold reads: O_DIRECT, or buffered after ``POSIX_FADV_DONTNEED``),
  against fio ``direct=1`` at several depths (the best is the device limit),
  naive Python ``open/write/readinto`` and numpy ``tofile/fromfile``. Every
  case, writes too, starts with the file's pages flushed and out of the page
  cache: a direct write into cached pages pays for their invalidation (pages
  the buffered cases before it left there made O_DIRECT writes look 2.5x
  costlier in CPU than they are).
- ``host``: batched copies into and out of the host tier against numpy
  ``copyto`` on one thread and on all CPUs (the faster is the memory limit);
  population time against a single thread touching the same pages.
- ``tiered``: a BlockManager whose host tier is a quarter of the working set:
  put (with offload to disk) and get (with onboarding) throughput.
- ``trace``: replay of a real KV reuse trace (the Mooncake traces shipped in
  ``dynblock/bench/traces``, or ``--trace PATH``).
- ``overhead``: per-call cost of match/put/get on small batches.
- ``durability``: disk-only put/get with checksums on against off, the same
  for puts into a full host tier whose victims go to disk (``put-offloading``),
  ``python -m dynblock.store verify`` against cold reads, and the time to
  reopen a persistent store of 100,000 blocks.
- ``engine``: what a serving engine feels: ``match`` p99 while another thread
  stores 128 MiB batches to disk, the longest stall of a Python thread ticking
  every 1 ms while another thread puts and gets, a 32-block put into a full
  host tier (write-behind) against one into free slots (p99), and 4 threads of
  async put/get against 1.
- ``vllm`` (not in the default run; needs vLLM, see :mod:`dynblock.bench.vllm`):
  time to first token of a request whose prefix comes from dynblock's disk
  tier against the same request recomputed, in real vLLM engines
  (``--vllm-models tiny,large``).
- ``remote`` (not in the default run; needs ``redis-server``, and redis-py for
  its baseline): the Redis remote tier's get against redis-py pipelined
  ``MGET``, async puts against no remote, a 3-master cluster against one
  server (:mod:`dynblock.bench.remote`).
- ``sglang`` (not in the default run; needs SGLang, see :mod:`dynblock.bench.sglang`):
  SGLang's HiCache L3 on dynblock against SGLang's own ``HiCacheFile`` on
  SGLang's own host pool: 128-page batches stored until the calls return and
  until durable, loaded cold, and ``batch_exists`` p99 during writes
  (``--sglang-page-sizes``, ``--sglang-size``).
- ``vllmtier`` (not in the default run; needs vLLM, see
  :mod:`dynblock.bench.vllm_tier`): ``DynblockTier`` against vLLM's own
  ``fs`` tier, both made by vLLM's ``SecondaryTierFactory``: chunks stored
  from the primary tier and loaded back cold (``--vllm-tier-chunk-sizes``,
  ``--vllm-tier-size``).
- ``policy`` (not in the default run): the traces replayed through the block
  manager's policy at three capacities, each policy configuration's hit rate
  and disk writes per disk hit beside Belady's offline optimum
  (:mod:`dynblock.bench.policy`).

Runs repeat (``--repeat``, default 3); each figure is the median with min and
max, and dynblock's runs are interleaved with the baselines' so drift of a
noisy machine hits both alike. Where two dynblock configurations are compared
with each other (``overhead``: each variant against LRU without metrics,
timed in three rounds of alternated ~10 ms windows per repeat; ``engine``: 4
threads against 1, their order swapped every repeat), the ratio is the median
of the rounds' (repeats') own ratios, so a slow stretch falls on both sides of
each one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

from .. import _core
from .baselines import FIO_INSTALL_HINT, Fio
from .common import Case, Progress, Results, machine_info, parse_size, size_label
from .workloads import (run_disk, run_durability, run_engine, run_host, run_overhead, run_tiered,
                        run_trace)

__all__ = ["main", "build_parser", "parse_size", "evaluate_goals", "FIO_INSTALL_HINT"]

WORKLOADS = ("disk", "host", "tiered", "trace", "overhead", "durability", "engine", "vllm",
             "remote", "policy", "sglang", "vllmtier")
DEFAULT_WORKLOADS = [w for w in WORKLOADS
                     if w not in ("vllm", "remote", "policy", "sglang", "vllmtier")]

# (workload, impl, op, param filter, ratio key, threshold, description)
GOALS: List[Tuple[str, str, str, Dict[str, Any], str, float, str]] = [
    # The disk engine against the device (fio at its best depth) and buffered mode against a
    # plain Python loop, random slots, every size: at least as fast, no more CPU per GiB.
    *[g for bs in (64 << 10, 256 << 10, 2 << 20) for op in ("read", "write") for g in (
        ("disk", "dynblock-o_direct", op, dict(block_size=bs, pattern="random"), "vs_device_limit",
         1.0, f"{size_label(bs)} random {op}s >= 1.0x fio's best depth"),
        ("disk", "dynblock-o_direct", op, dict(block_size=bs, pattern="random"),
         "cpu_vs_device_limit", 1.0,
         f"{size_label(bs)} random {op}s: CPU per GiB <= 1.0x fio's at its best depth"),
        ("disk", "dynblock-buffered", op, dict(block_size=bs, pattern="random"), "vs_python_naive",
         1.1, f"{size_label(bs)} random {op}s in buffered mode >= 1.1x a Python pwrite/pread loop"),
    )],
    ("disk", "dynblock-o_direct", "read", dict(block_size=2 << 20, pattern="random"), "vs_python_naive", 1.0,
     "cold reads at least as fast as naive buffered Python (2 MiB)"),
    ("host", "dynblock", "write", {}, "vs_memory_limit", 0.8, "host-tier copies in >= 0.8x memory limit"),
    ("host", "dynblock", "read", {}, "vs_memory_limit", 0.8, "host-tier copies out >= 0.8x memory limit"),
    ("host", "dynblock", "populate", {}, "speedup_vs_single_thread", 1.5,
     "host-tier population >= 1.5x faster than one thread"),
    *[("overhead", "dynblock-metrics", op, {}, "vs_metrics_off", 0.98,
       f"{op} with dynblock.metrics registered and scraped >= 0.98x without")
      for op in ("match-10000-hashes", "put-1000-present", "get-1-block-4KiB", "match-1-hash")],
    *[("overhead", "dynblock-s3fifo", op, {}, "vs_lru", 0.9,
       f"{op} with host_eviction='s3fifo' >= 0.9x with LRU")
      for op in ("put-1000-present", "get-1-block-4KiB", "put-64-new-evicting")],
    *[("durability", "checksums-on", op, {}, key, thr, f"disk {what} with checksums {goal}")
      for op, what in (("put", "writes"), ("get", "reads"))
      for key, thr, goal in (("vs_checksums_off", 0.97, ">= 0.97x without"),
                             ("cpu_vs_checksums_off", 1.05, "use CPU per GiB within +5% of without"))],
    ("durability", "store-verify", "verify", {}, "vs_cold_get", 0.8,
     "python -m dynblock.store verify >= 0.8x the cold reads with checksums"),
    ("engine", "dynblock", "match-32-during-disk-puts", {}, "goal_1ms_over_p99", 1.0,
     "match of 32 hashes p99 < 1 ms while another thread stores 128 MiB batches"),
    ("engine", "python-thread", "tick-gap-during-puts-gets", {}, "vs_numpy_copies", 1.0,
     "a ticking Python thread stalls no longer during dynblock puts/gets than during numpy copies"),
    ("engine", "python-thread", "tick-gap-during-puts-gets", {}, "goal_5ms_over_max", 1.0,
     "a ticking Python thread stalls < 5 ms while another thread puts and gets"),
    ("engine", "dynblock", "put-32-into-full-host-tier", {}, "free_over_full", 0.5,
     "32-block put into a full host tier (write-behind) p99 <= 2x into free slots"),
    ("remote", "dynblock", "get", dict(block_size=256 << 10), "vs_redis_py_mget", 1.5,
     "256 KiB get through the remote tier >= 1.5x redis-py pipelined MGET"),
    ("remote", "dynblock", "get", dict(block_size=2 << 20), "vs_redis_py_mget", 1.5,
     "2 MiB get through the remote tier >= 1.5x redis-py pipelined MGET"),
    ("remote", "dynblock-async", "put-32", {}, "vs_no_remote", 1.2,
     "put with remote_write='async': caller-visible time <= 1.2x the same put without a remote"),
    ("remote", "dynblock-mac", "get", dict(block_size=256 << 10), "vs_no_secret", 0.9,
     "256 KiB remote get with remote_secret (MAC) >= 0.9x without (CRC32C)"),
    ("remote", "dynblock-mac", "get", dict(block_size=2 << 20), "vs_no_secret", 0.9,
     "2 MiB remote get with remote_secret (MAC) >= 0.9x without (CRC32C)"),
    ("remote", "dynblock-mac", "put-sync", dict(block_size=256 << 10), "vs_no_secret", 0.9,
     "256 KiB remote put (sync) with remote_secret (MAC) >= 0.9x without (CRC32C)"),
    ("remote", "dynblock-mac", "put-sync", dict(block_size=2 << 20), "vs_no_secret", 0.9,
     "2 MiB remote put (sync) with remote_secret (MAC) >= 0.9x without (CRC32C)"),
    ("engine", "dynblock", "async-put-get", dict(threads=4), "vs_1_thread", 1.0,
     "4 threads of async put/get >= 1.0x aggregate of 1 thread"),
    *[("sglang", "dynblock", "set-durable", dict(block_size=b), "vs_hicache_file", 3.0,
       f"{size_label(b)} pages: batch_set_v1 until durable >= 3x HiCacheFile set + os.sync()")
      for b in (64 << 10, 256 << 10, 2 << 20)],
    ("sglang", "dynblock", "set-return", {}, "vs_hicache_file", 1.5,
     "batch_set_v1 until it returns >= 1.5x HiCacheFile through the controller's path"),
    ("sglang", "dynblock", "get-cold", {}, "vs_hicache_file", 2.0,
     "batch_get_v1 pages/s, cold, >= 2x HiCacheFile"),
    ("sglang", "dynblock", "exists-128-during-writes", {}, "goal_0.2ms_over_p99", 1.0,
     "batch_exists of 128 keys p99 < 0.2 ms while another thread writes"),
    ("sglang", "dynblock", "set-durable", {}, "cpu_vs_hicache_file", 0.5,
     "CPU seconds per GiB stored (until durable) <= 0.5x HiCacheFile's"),
    ("sglang", "dynblock", "get-cold", {}, "cpu_vs_hicache_file", 0.5,
     "CPU seconds per GiB loaded (cold) <= 0.5x HiCacheFile's"),
    *[("vllmtier", "dynblock-tier", op, {}, "vs_vllm_fs_tier", 1.5,
       f"DynblockTier {op} >= 1.5x vLLM's fs tier") for op in ("store", "load-cold")],
    *[("vllmtier", "dynblock-tier", op, {}, "cpu_vs_vllm_fs_tier", 0.7,
       f"DynblockTier {op}: CPU per GiB <= 0.7x vLLM's fs tier's") for op in ("store", "load-cold")],
    # The eviction beyond LRU that measured best on these traces: S3-FIFO in the disk tier, LRU in
    # the host tier (S3-FIFO in both was lower on the conversation trace and the synthetic one).
    ("policy", "lru+s3fifo/all", "replay", dict(trace="conversation"), "gap_closed", 0.5,
     "the best eviction beyond LRU (disk_eviction='s3fifo') closes >= 50% of LRU's gap to "
     "Belady's optimum on the conversation trace"),
    ("policy", "lru+s3fifo/all", "replay", {}, "hit_vs_lru_points", 0.0,
     "the best eviction beyond LRU (disk_eviction='s3fifo') is never below LRU's hit rate"),
    ("policy", "lru/reuse", "replay", {}, "writes_per_disk_hit_vs_all", 0.5,
     "disk writes per disk hit with disk_admission='reuse' <= 0.5x 'all'"),
    ("policy", "lru/reuse", "replay", {}, "hit_vs_all_points", -2.0,
     "hit rate with disk_admission='reuse' no more than 2 points below 'all'"),
    ("policy", "quotas/flood", "tenants", {}, "vs_alone", 0.95,
     "a tenant under a 10x flood from another keeps >= 0.95x of its hit rate alone (quotas)"),
]


# Ratio keys whose goal is an upper bound (a time over its baseline's): met at or below the threshold.
AT_MOST = {"vs_no_remote", "writes_per_disk_hit_vs_all", "cpu_vs_hicache_file",
           "cpu_vs_vllm_fs_tier", "cpu_vs_device_limit", "cpu_vs_checksums_off"}


def evaluate_goals(cases: List[Case]) -> List[Dict[str, Any]]:
    out = []
    for wl, impl, op, filt, key, thr, desc in GOALS:
        for c in cases:
            if (c.workload, c.impl, c.op) != (wl, impl, op):
                continue
            if any(c.params.get(k) != v for k, v in filt.items()):
                continue
            if key not in c.ratios:
                continue
            r = c.ratios[key]
            met = r <= thr if key in AT_MOST else r >= thr
            out.append({"goal": desc, "key": key, "ratio": r, "threshold": thr, "met": met,
                        "params": c.params})
    return out


def _sizes(text: str) -> List[int]:
    return [parse_size(t) for t in text.split(",") if t.strip()]


def _ints(text: str) -> List[int]:
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"values must be >= 1: {text!r}")
    return vals


def _choices(allowed: tuple):
    def parse(text: str) -> List[str]:
        vals = [t.strip() for t in text.split(",") if t.strip()]
        bad = [v for v in vals if v not in allowed]
        if bad or not vals:
            raise argparse.ArgumentTypeError(f"{bad or text!r}: choose from {', '.join(allowed)}")
        return vals
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dynblock.bench",
        description="dynblock throughput, side by side with fio, naive Python and numpy.",
    )
    p.add_argument("--workloads", type=_choices(WORKLOADS), default=list(DEFAULT_WORKLOADS),
                   help=f"comma-separated subset of {','.join(WORKLOADS)} (default: all but vllm "
                   "and remote)")
    p.add_argument("--dir", help="directory for test files (default: a new temporary directory)")
    p.add_argument("--repeat", type=int, default=3, help="runs per case (default: 3)")
    g = p.add_argument_group("disk")
    g.add_argument("--block-sizes", type=_sizes, default=[64 << 10, 256 << 10, 2 << 20],
                   help="comma-separated block sizes (default: 64KiB,256KiB,2MiB)")
    g.add_argument("--disk-size", type=parse_size, default=128 << 20,
                   help="bytes per disk case (default: 128MiB)")
    g.add_argument("--patterns", type=_choices(("random", "sequential")), default=["random"],
                   help="slot order: random,sequential (default: random)")
    g.add_argument("--modes", type=_choices(("o_direct", "buffered", "o_direct-threads")),
                   default=["o_direct", "buffered"],
                   help="dynblock I/O modes (default: o_direct,buffered; o_direct-threads: O_DIRECT on "
                        "the worker pool instead of the default engine, io_uring where the kernel has it)")
    g.add_argument("--io-depth", type=int, default=None,
                   help="dynblock I/Os in flight (default: the storage's own choice from the block "
                        "size and the device)")
    g.add_argument("--batch-size", type=parse_size, default=32 << 20,
                   help="bytes per dynblock call (default: 32MiB)")
    g.add_argument("--fio-depths", type=_ints, default=[1, 4, 16, 32],
                   help="fio iodepths; the best is the device limit (default: 1,4,16,32)")
    g.add_argument("--no-fio", action="store_true", help="skip the fio baseline")
    g = p.add_argument_group("host")
    g.add_argument("--host-size", type=parse_size, default=256 << 20,
                   help="bytes copied per host case (default: 256MiB)")
    g.add_argument("--populate-size", type=parse_size, default=1 << 30,
                   help="host tier size for the population case (default: 1GiB)")
    g = p.add_argument_group("tiered")
    g.add_argument("--tiered-size", type=parse_size, default=256 << 20,
                   help="working set of the tiered case (default: 256MiB)")
    g.add_argument("--tiered-block-size", type=parse_size, default=2 << 20,
                   help="block size of the tiered and host cases (default: 2MiB)")
    g = p.add_argument_group("engine")
    g.add_argument("--engine-seconds", type=float, default=2.0,
                   help="seconds each concurrent engine case runs (default: 2)")
    g = p.add_argument_group("vllm")
    g.add_argument("--vllm-python", help="an interpreter with vllm and dynblock (default: "
                   "$DYNBLOCK_VLLM_PYTHON, .venv-vllm/bin/python, this one)")
    g.add_argument("--vllm-models", type=_choices(("tiny", "large")), default=["tiny", "large"],
                   help="random-weight Llamas: tiny (2 layers, 384-token prefix), large (8 layers, "
                   "hidden 1024, 2048-token prefix) (default: tiny,large)")
    g.add_argument("--vllm-tier-chunk-sizes", type=_sizes,
                   default=[64 << 10, 256 << 10, 2 << 20],
                   help="vllmtier: bytes per chunk (default: 64KiB,256KiB,2MiB)")
    g.add_argument("--vllm-tier-size", type=parse_size, default=256 << 20,
                   help="vllmtier: bytes stored and loaded per chunk size and repeat "
                   "(default: 256MiB)")
    g = p.add_argument_group("sglang")
    g.add_argument("--sglang-python", help="an interpreter with SGLang and dynblock (default: "
                   "$DYNBLOCK_SGLANG_PYTHON, .venv-vllm/bin/python, this one)")
    g.add_argument("--sglang-page-sizes", type=_sizes, default=[64 << 10, 256 << 10, 2 << 20],
                   help="bytes per page, multiples of 64KiB (default: 64KiB,256KiB,2MiB)")
    g.add_argument("--sglang-size", type=parse_size, default=256 << 20,
                   help="bytes stored and loaded per page size and repeat (default: 256MiB)")
    g = p.add_argument_group("trace")
    g.add_argument("--trace", help="trace: a JSONL file (.jsonl or .jsonl.gz) or a shipped one, "
                   "mooncake_conversation (default) or mooncake_synthetic")
    g.add_argument("--trace-requests", type=int, default=2000,
                   help="replay the first N requests (default: 2000; 0: all)")
    g.add_argument("--payload", type=parse_size, default=64 << 10,
                   help="bytes per trace block (default: 64KiB)")
    g.add_argument("--trace-host-blocks", type=int, default=2048, help="host tier blocks (default: 2048)")
    g.add_argument("--trace-disk-blocks", type=int, default=16384, help="disk tier blocks (default: 16384)")
    g = p.add_argument_group("durability")
    g.add_argument("--recovery-blocks", type=int, default=100_000,
                   help="blocks in the persistent store whose reopen is timed (default: 100000)")
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    g.add_argument("--out", help="also write the JSON object to this file")
    g.add_argument("--plot", help="write a PNG of disk throughput and CPU per GiB by block size and depth "
                                  "(needs matplotlib)")
    return p


def _validate(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    for name in ("repeat", "io_depth", "trace_host_blocks", "trace_disk_blocks", "recovery_blocks"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.trace_requests < 0:
        p.error("--trace-requests must be >= 0")
    bad = [b for b in a.sglang_page_sizes if b % (64 << 10)]
    if bad or not a.sglang_page_sizes:
        p.error(f"--sglang-page-sizes must be multiples of 64KiB (one layer's K and V), got {bad}")
    if a.dir is not None and not os.path.isdir(a.dir):
        p.error(f"--dir {a.dir!r} is not a directory")
    if a.trace is not None:
        from .trace import SHIPPED_TRACES, find_trace

        found = find_trace(a.trace)
        if found is None:
            p.error(f"--trace {a.trace!r} is neither a file nor a shipped trace "
                    f"({', '.join(SHIPPED_TRACES)})")
        a.trace = found
    if a.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib: pip install 'dynblock[plot]' (or pip install matplotlib)")


def run(a: argparse.Namespace, directory: str, progress: Progress) -> "tuple[Results, Fio]":
    res = Results()
    fio = Fio(enabled=not a.no_fio)
    if "disk" in a.workloads:
        run_disk(res, directory, a.block_sizes, a.disk_size, a.patterns, a.modes, a.io_depth,
                 a.batch_size, fio, a.fio_depths, a.repeat, progress)
        if fio.error:  # also an error that came up while fio ran
            res.note(fio.error)
    if "host" in a.workloads:
        run_host(res, a.host_size, a.tiered_block_size, a.populate_size, a.repeat, progress)
    if "tiered" in a.workloads:
        run_tiered(res, directory, a.tiered_block_size, a.tiered_size, 0.25, a.io_depth,
                   a.batch_size, a.repeat, progress)
    if "trace" in a.workloads:
        run_trace(res, directory, a.trace, a.payload, a.trace_host_blocks, a.trace_disk_blocks,
                  a.trace_requests or None, a.repeat, progress)
    if "overhead" in a.workloads:
        run_overhead(res, a.repeat, progress)
    if "durability" in a.workloads:
        run_durability(res, directory, a.tiered_block_size, a.tiered_size, a.recovery_blocks,
                       a.io_depth, a.batch_size, a.repeat, progress)
    if "engine" in a.workloads:
        run_engine(res, directory, a.repeat, progress, seconds=a.engine_seconds)
    if "vllm" in a.workloads:
        from .vllm import run_vllm

        run_vllm(res, directory, a.vllm_python, a.vllm_models, a.repeat, progress)
    if "remote" in a.workloads:
        from .remote import run_remote

        run_remote(res, directory, a.repeat, progress)
    if "sglang" in a.workloads:
        from .sglang import run_sglang

        run_sglang(res, directory, a.sglang_python, a.sglang_page_sizes, a.sglang_size, a.repeat,
                   progress)
    if "vllmtier" in a.workloads:
        from .vllm_tier import run_vllm_tier

        run_vllm_tier(res, directory, a.vllm_python, a.vllm_tier_chunk_sizes, a.vllm_tier_size,
                      a.repeat, progress)
    if "policy" in a.workloads:
        from .policy import run_policy, run_tenants

        run_policy(res, directory, progress)
        run_tenants(res, directory, progress)
    return res, fio


def show_ratio(key: str, v: float) -> str:
    """A ratio as ``1.23x``; a difference in points (a key ending in ``_points``) as ``-1.23 pts``."""
    return f"{v:+.2f} pts" if key.endswith("_points") else f"{v:.2f}x"


def format_table(res: Results) -> str:
    rows = [("workload", "impl", "op", "case", "median", "min..max", "CPU s/GiB", "ratios")]
    for c in res.cases:
        p = dict(c.params)
        bits = []
        if "block_size" in p:
            bits.append(size_label(int(p.pop("block_size"))))
        if "pattern" in p:
            bits.append(str(p.pop("pattern")))
        if "io_depth" in p:
            bits.append(f"depth {p.pop('io_depth')}")
        if c.workload == "trace":
            bits = [f"{c.params['requests']} req", f"payload {size_label(int(c.params['payload_bytes']))}"]
        if c.workload == "overhead":
            bits = [f"{c.params['hashes']} hashes"]
        if c.workload == "host" and c.op == "populate":
            bits = [size_label(int(c.params["bytes"]))]
        if c.workload == "durability" and c.op == "reopen":
            bits = [f"{c.params['blocks']} blocks"]
        if c.workload == "vllm":
            bits = [f"{c.params['model']}, {c.params['prefix_tokens']}-token prefix"]
        if c.workload == "policy":
            bits = [str(c.params["trace"]), f"host {c.params['host_blocks']}, disk {c.params['disk_blocks']}"]
        ratios = " ".join(f"{k}={show_ratio(k, v)}" for k, v in c.ratios.items())
        if c.workload == "trace":
            e = c.extra
            ratios = (f"hit {e['hit_rate']:.1%} (host {e['host_hit_rate']:.1%}, disk "
                      f"{e['disk_hit_rate']:.1%}), {e['tokens_saved']} tokens saved, "
                      f"{e['requests_per_s']:.0f} req/s")
        if c.workload == "tiered":
            e = c.extra
            ratios = ", ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}" for k, v in e.items())
        if c.workload == "durability" and c.op == "reopen":
            ratios = ", ".join(f"{k}={v}" for k, v in c.extra.items())
        if c.workload == "policy":
            from .policy import describe

            ratios = describe(c.extra) + "; " + ratios
        if c.workload == "vllm" and c.impl != "recompute":
            ratios += " " + ", ".join(f"{k}={v}" for k, v in c.extra.items())
        cpu = c.cpu_s_per_gib
        rows.append((c.workload, c.impl, c.op, ", ".join(bits), f"{c.median:.3g} {c.unit}",
                     f"{min(c.values):.3g}..{max(c.values):.3g}" if c.values else "",
                     "" if cpu is None else f"{cpu:.3g}", ratios))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_plot(res: Results, path: str) -> None:
    """Disk throughput (top) and CPU seconds per GiB (bottom) by block size,
    random writes and reads, every implementation and depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    disk = [c for c in res.cases if c.workload == "disk" and c.values]
    ops = ["write", "read"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ticks = sorted({int(c.params["block_size"]) >> 10 for c in disk})
    for col, op in enumerate(ops):
        for row, (metric, unit) in enumerate((("median", "GiB/s"), ("cpu_s_per_gib", "CPU s/GiB"))):
            ax = axes[row][col]
            series: Dict[str, Dict[int, float]] = {}
            for c in disk:
                if c.op != op or c.params.get("pattern") != "random":
                    continue
                value = getattr(c, metric)
                if value is None:
                    continue
                label = c.impl + (f" d{c.params['io_depth']}" if c.impl == "fio" else "")
                series.setdefault(label, {})[int(c.params["block_size"])] = value
            for label, pts in sorted(series.items()):
                xs = sorted(pts)
                style = "-o" if label.startswith("dynblock") else "--."
                ax.plot([x >> 10 for x in xs], [pts[x] for x in xs], style, label=label)
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks)
            ax.set_xticklabels([str(t) for t in ticks])
            ax.set_xlabel("block size (KiB)")
            ax.set_ylabel(unit)
            ax.set_title(f"random {op}s: {'throughput' if row == 0 else 'CPU per GiB (lower is better)'}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    _validate(parser, a)
    tmp = None
    directory = a.dir
    if directory is None:
        tmp = tempfile.TemporaryDirectory(prefix="dynblock-bench-")
        directory = tmp.name
    progress = Progress(enabled=sys.stderr.isatty() and not a.json)
    t0 = time.perf_counter()
    try:
        res, fio = run(a, directory, progress)
        info = machine_info(directory)
    finally:
        progress.close()
        if tmp is not None:
            tmp.cleanup()
    goals = evaluate_goals(res.cases)
    result: Dict[str, Any] = {
        "machine": info,
        "command": "python -m dynblock.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seconds": time.perf_counter() - t0,
        "fio": {"executable": fio.exe, "engine": fio.engine, "error": fio.error},
        "notes": res.notes,
        "cases": [c.summary() for c in res.cases],
        "goals": goals,
    }
    text = json.dumps(result, indent=2)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    if a.plot:
        write_plot(res, a.plot)
        from .policy import write_plot as write_policy_plot

        write_policy_plot(res, a.plot)
    if a.json:
        print(text)
        return 0
    m = result["machine"]
    print(f"dynblock bench: {m['filesystem']} at {m['directory']}, kernel {m['kernel']}, "
          f"{m['cpus']} CPUs, {m['build']} build, {result['seconds']:.0f} s")
    if _core.build_profile() != "release":
        print("WARNING: debug build; numbers are not representative")
    print(format_table(res))
    if goals:
        print()
        for g in goals:
            print(f"  [{'met' if g['met'] else 'NOT met'}] {g['goal']}: {show_ratio(g['key'], g['ratio'])}")
    for n in res.notes:
        print(f"note: {n}")
    return 0
