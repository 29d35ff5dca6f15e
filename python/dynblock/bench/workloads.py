"""The bench's workloads. Each appends measured cases to a Results object;
dynblock's runs are interleaved with the baselines' in every repeat."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np

from .. import _core
from ..buffers import aligned_empty
from ..config import Config
from ..disk import DiskStorage
from ..host import HostStorage
from ..manager import BlockManager
from . import trace as trace_mod
from .baselines import Fio, copyto_threads, naive_python, numpy_file
from .common import Progress, Results, size_label, timed


def _zeros(n: int) -> np.ndarray:
    """An aligned buffer with every page already touched, so the first timed
    case that writes into it does not pay the page faults for the others."""
    buf = aligned_empty(n)
    buf.fill(0)
    return buf


def _rand(n: int, seed: int) -> np.ndarray:
    buf = aligned_empty(n)
    rng = np.random.default_rng(seed)
    step = 64 << 20
    for i in range(0, n, step):
        buf[i:i + step] = rng.integers(0, 256, size=min(step, n - i), dtype=np.uint8)
    return buf


def run_disk(
    res: Results,
    directory: str,
    block_sizes: Sequence[int],
    case_bytes: int,
    patterns: Sequence[str],
    modes: Sequence[str],
    io_depth: Optional[int],
    batch_bytes: int,
    fio: Fio,
    fio_depths: Sequence[int],
    repeat: int,
    progress: Progress,
) -> None:
    if not fio.available:
        res.note(fio.error or "")
    for bs in block_sizes:
        n = max(4, case_bytes // bs)
        nbytes = n * bs
        batch = max(1, batch_bytes // bs)
        buf = _rand(nbytes, seed=bs)
        out = _zeros(nbytes)
        orders = {
            "random": np.random.default_rng(bs).permutation(n).astype(np.uint64),
            "sequential": np.arange(n, dtype=np.uint64),
        }
        stores: Dict[str, DiskStorage] = {}
        # One file for everyone (dynblock in each mode, fio, naive Python), so
        # every implementation reads the same data from the same place.
        base_path = os.path.join(directory, f".dynblock-bench-{os.getpid()}-{bs}")
        try:
            for mode in modes:
                stores[mode] = DiskStorage(base_path, n, bs, io_depth=io_depth, persist=True,
                                           o_direct=mode.startswith("o_direct"), lock=False,
                                           engine="threads" if mode.endswith("-threads") else "auto")
                if mode.startswith("o_direct") and not stores[mode].o_direct:
                    res.note(f"O_DIRECT unavailable in {directory}: {stores[mode].fallback_reason}")
            if not stores:
                stores["o_direct"] = DiskStorage(base_path, n, bs, persist=True, lock=False)
            first = next(iter(stores.values()))
            slots_at = first.data_offset  # the store's header comes before slot 0
            # Written once by each store, untimed: every run overwrites, and a
            # store's first batches (buffered mode most: the kernel's page-cache
            # and write-back state for the file) cost up to 2x the later ones.
            for s in stores.values():
                s.write_blocks(orders["sequential"], buf)
                s.sync()
            first.drop_page_cache()
            progress.add(repeat * len(patterns) * 2 * (len(modes) + 2 + (len(fio_depths) if fio.available else 0)))
            for _ in range(repeat):
                for pattern in patterns:
                    order = orders[pattern]
                    p: Dict[str, Any] = dict(block_size=bs, pattern=pattern, blocks=n)
                    for op in ("write", "read"):
                        label = f"{pattern} {op} {size_label(bs)}"
                        if fio.available:
                            rw = {("random", "read"): "randread", ("random", "write"): "randwrite",
                                  ("sequential", "read"): "read", ("sequential", "write"): "write"}[(pattern, op)]
                            for d in fio_depths:
                                first.drop_page_cache()
                                bw = fio.run(base_path, rw, bs, nbytes, d, offset=slots_at)
                                if bw is not None:
                                    fc = res.case("disk", "fio", op, io_depth=d, **p)
                                    fc.values.append(bw / (1 << 30))
                                    if fio.cpu_s_per_gib is not None:
                                        fc.cpu.append(fio.cpu_s_per_gib)
                                progress.step(f"fio d{d} {label}")
                        w, r = naive_python(base_path, [int(x) for x in order], bs, buf, slots_at)
                        first.drop_page_cache()
                        res.case("disk", "python-naive", op, **p).add_rate(nbytes, timed(w if op == "write" else r))
                        progress.step(f"naive {label}")
                        first.drop_page_cache()
                        if pattern == "sequential":
                            nw, nr = numpy_file(base_path, buf, slots_at)
                            res.case("disk", "numpy-tofile" if op == "write" else "numpy-fromfile", op,
                                     **p).add_rate(nbytes, timed(nw if op == "write" else nr))
                        progress.step(f"numpy {label}")
                        for mode, s in stores.items():
                            def w_dyn(s: DiskStorage = s, order: np.ndarray = order) -> None:
                                for i in range(0, n, batch):
                                    s.write_blocks(order[i:i + batch], buf[i * bs:(i + batch) * bs])
                                s.sync()

                            def r_dyn(s: DiskStorage = s, order: np.ndarray = order) -> None:
                                for i in range(0, n, batch):
                                    s.read_blocks(order[i:i + batch], out[i * bs:(i + batch) * bs])

                            s.drop_page_cache()
                            c = res.case("disk", f"dynblock-{mode}", op, io_depth=s.io_depth, **p)
                            c.add_rate(nbytes, timed(w_dyn if op == "write" else r_dyn))
                            c.extra = {"o_direct": s.o_direct, "alignment": s.alignment,
                                       "batch_blocks": batch, "engine": s.engine,
                                       "io_depth_given": io_depth}
                            if op == "read" and not np.array_equal(out, buf):
                                raise RuntimeError(f"dynblock ({mode}) read back other bytes than it wrote")
                            progress.step(f"dynblock {mode} {label}")
            # ratios to the device limit (fio at its best depth) and to naive Python
            for pattern in patterns:
                p = dict(block_size=bs, pattern=pattern, blocks=n)
                for op in ("write", "read"):
                    found = [res.find("disk", "fio", op, io_depth=d, **p) for d in fio_depths]
                    fios = [c for c in found if c is not None and c.values]
                    best = max(fios, key=lambda c: c.median) if fios else None
                    naive = res.find("disk", "python-naive", op, **p)
                    for mode in modes:
                        depth = stores[mode].io_depth
                        same = res.find("disk", "fio", op, io_depth=depth, **p)
                        dc = res.find("disk", f"dynblock-{mode}", op, io_depth=depth, **p)
                        if dc is None:
                            continue
                        c = dc
                        if best is not None:
                            c.ratios["vs_device_limit"] = c.median / best.median
                            c.extra["device_limit_depth"] = best.params["io_depth"]
                            if c.cpu_s_per_gib is not None and best.cpu_s_per_gib:
                                c.ratios["cpu_vs_device_limit"] = c.cpu_s_per_gib / best.cpu_s_per_gib
                        if same is not None and same.values:
                            c.ratios["vs_fio_same_depth"] = c.median / same.median
                        if naive is not None:
                            c.ratios["vs_python_naive"] = c.median / naive.median
                            if c.cpu_s_per_gib is not None and naive.cpu_s_per_gib:
                                c.ratios["cpu_vs_python_naive"] = c.cpu_s_per_gib / naive.cpu_s_per_gib
        finally:
            for s in stores.values():
                s.close()
            if os.path.exists(base_path):
                os.unlink(base_path)


def run_host(res: Results, host_bytes: int, block_size: int, populate_bytes: int,
             repeat: int, progress: Progress) -> None:
    n = max(2, host_bytes // block_size)
    nbytes = n * block_size
    threads = len(os.sched_getaffinity(0))
    src = _rand(nbytes, seed=7)
    out = aligned_empty(nbytes)
    scratch = aligned_empty(nbytes)
    order = np.random.default_rng(7).permutation(n).astype(np.uint64)
    p: Dict[str, Any] = dict(block_size=block_size, blocks=n)
    progress.add(repeat * 4)
    with HostStorage(n, block_size, numa_node="auto", pin=True) as h:
        h.write_blocks(order, src)  # warm every page before timing
        np.copyto(scratch, src)
        copyto_threads(out, src, threads)
        for _ in range(repeat):
            c1 = res.case("host", "numpy-copyto-1thread", "copy", **p)
            c1.add_rate(nbytes, timed(lambda: np.copyto(scratch, src)))
            progress.step("numpy copyto 1 thread")
            cn = res.case("host", f"numpy-copyto-{threads}threads", "copy", **p)
            cn.add_rate(nbytes, timed(lambda: copyto_threads(scratch, src, threads)))
            progress.step(f"numpy copyto {threads} threads")
            res.case("host", "dynblock", "write", **p).add_rate(nbytes, timed(lambda: h.write_blocks(order, src)))
            progress.step("dynblock host write")
            res.case("host", "dynblock", "read", **p).add_rate(nbytes, timed(lambda: h.read_blocks(order, out)))
            progress.step("dynblock host read")
            if not np.array_equal(out, src):
                raise RuntimeError("host tier read back other bytes than it wrote")
        pinned, node = h.pinned, h.numa_node
    one = res.find("host", "numpy-copyto-1thread", "copy", **p)
    many = res.find("host", f"numpy-copyto-{threads}threads", "copy", **p)
    assert one is not None and many is not None
    limit = max(one.median, many.median)
    for op in ("write", "read"):
        c = res.find("host", "dynblock", op, **p)
        assert c is not None
        c.ratios["vs_memory_limit"] = c.median / limit
        c.ratios["vs_numpy_copyto_1thread"] = c.median / one.median
        c.extra = {"pinned": pinned, "numa_node": node}
    # Population: our parallel populate against one thread touching pages.
    progress.add(repeat * 2)
    pop_blocks = max(1, populate_bytes // (2 << 20))
    pp: Dict[str, Any] = dict(bytes=pop_blocks * (2 << 20))
    for _ in range(repeat):
        single = _core.single_thread_touch_seconds(pop_blocks * (2 << 20), True)
        res.case("host", "single-thread-touch", "populate", unit="s", **pp).values.append(single)
        progress.step("single-thread touch")
        with HostStorage(pop_blocks, 2 << 20, numa_node="auto", pin=False) as h:
            res.case("host", "dynblock", "populate", unit="s", **pp).values.append(h.populate_seconds)
            threads_used = h.populate_threads
        progress.step("dynblock populate")
    c = res.find("host", "dynblock", "populate", **pp)
    s = res.find("host", "single-thread-touch", "populate", **pp)
    assert c is not None and s is not None
    c.ratios["speedup_vs_single_thread"] = s.median / c.median
    c.extra = {"threads": threads_used}


def run_tiered(res: Results, directory: str, block_size: int, working_bytes: int,
               host_fraction: float, io_depth: Optional[int], batch_bytes: int, repeat: int,
               progress: Progress) -> None:
    """Puts that offload, then gets of disk hits that promote: into an aligned
    destination and into one 64 bytes off a page (as engines' buffers often
    are), each with a fresh manager."""
    w = max(8, working_bytes // block_size)
    host_blocks = max(1, int(w * host_fraction))
    batch = max(1, batch_bytes // block_size)
    src = _rand(w * block_size, seed=3)
    out_all = _zeros(w * block_size + 4096)
    p: Dict[str, Any] = dict(block_size=block_size, working_set_blocks=w, host_blocks=host_blocks, disk_blocks=w)
    progress.add(repeat * 4)
    for _ in range(repeat):
        for dst_label, offset in (("", 0), (", unaligned dst", 64)):
            out = out_all[offset:offset + w * block_size]
            cfg = Config(block_size=block_size, host_blocks=host_blocks, disk_blocks=w,
                         disk_dir=directory, io_depth=io_depth)
            with BlockManager(cfg) as m:
                hashes = np.arange(1, w + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)

                def put_all() -> None:
                    for i in range(0, w, batch):
                        m.put(hashes[i:i + batch], src[i * block_size:(i + batch) * block_size])

                t = timed(put_all)
                st = m.stats()
                if not offset:
                    c = res.case("tiered", "dynblock", "put+offload", **p)
                    c.add_rate(w * block_size, t)
                    c.extra = {"offloaded_blocks": st["offloaded_blocks"],
                               "offload_blocks_per_s": st["offloaded_blocks"] / t}
                progress.step("tiered put (offload)")
                order = np.random.default_rng(5).permutation(w)

                def get_all() -> None:
                    for i in range(0, w, batch):
                        idx = order[i:i + batch]
                        got = m.get(hashes[idx], out[i * block_size:(i + len(idx)) * block_size])
                        if got != len(idx):
                            raise RuntimeError("a block put in this run was not found")

                before = m.stats()
                t = timed(get_all)
                st = m.stats()
                onboarded = st["onboarded_blocks"] - before["onboarded_blocks"]
                c = res.case("tiered", "dynblock", "get+onboard" + dst_label, **p)
                c.add_rate(w * block_size, t)
                c.extra = {"disk_hits": st["disk_hits"] - before["disk_hits"],
                           "onboarded_blocks": onboarded, "onboard_blocks_per_s": onboarded / t}
                for k, i in enumerate(order[:4]):
                    if not np.array_equal(out[k * block_size:(k + 1) * block_size],
                                          src[i * block_size:(i + 1) * block_size]):
                        raise RuntimeError("tiered get returned other bytes than were put")
                progress.step("tiered get (onboard)")


def run_trace(res: Results, directory: str, path: Optional[str], payload: int, host_blocks: int,
              disk_blocks: int, limit: Optional[int], repeat: int, progress: Progress) -> None:
    path = path or trace_mod.find_trace()
    if path is None:
        res.note("trace: the shipped trace is missing from this installation (pass --trace PATH); skipped")
        return
    reqs = trace_mod.load_trace(path, limit=limit)
    p: Dict[str, Any] = dict(trace=os.path.basename(path), requests=len(reqs), payload_bytes=payload,
             host_blocks=host_blocks, disk_blocks=disk_blocks)
    progress.add(repeat)
    for _ in range(repeat):
        cfg = Config(block_size=payload, host_blocks=host_blocks, disk_blocks=disk_blocks,
                     disk_dir=directory)
        with BlockManager(cfg) as m:
            r = trace_mod.replay(m, reqs)
        c = res.case("trace", "dynblock", "replay", **p)
        c.values.append(r.as_dict()["gib_s"])
        c.extra = r.as_dict()
        progress.step("trace replay")


#: Rounds of alternated windows per repeat of each overhead case.
OVERHEAD_ROUNDS = 3


def _window(fn: Callable[[], Any]) -> float:
    """Seconds per call of ``fn``, over a window of about 10 ms (at least 200
    calls: one interruption of a few hundred microseconds must not decide a
    sub-microsecond case), after calls for at least 5 ms untimed: a manager
    left alone while others were timed has to get its memory back into the
    caches (a window right after another manager's ran up to 1.3x slower
    than one right after its own)."""
    t0 = time.perf_counter()
    calls = 0
    while calls < 20 or time.perf_counter() - t0 < 0.005:
        fn()
        calls += 1
    est = (time.perf_counter() - t0) / calls
    k = min(100_000, max(200, int(0.01 / max(est, 1e-9))))
    t0 = time.perf_counter()
    for _i in range(k):
        fn()
    return (time.perf_counter() - t0) / k


def run_overhead(res: Results, repeat: int, progress: Progress) -> None:
    """Per-call cost of small calls, on a manager whose host tier evicts by
    LRU (``dynblock``) and one by S3-FIFO (``dynblock-s3fifo``), interleaved;
    with prometheus_client installed, also on a manager whose
    dynblock.metrics collector a thread scrapes every 100 ms while that manager
    is timed (a hundred times Prometheus's usual rate; each figure is the
    median window, so a scrape landing in one shows in its max).
    ``put-64-new-evicting`` stores 64 new blocks
    into a full host tier of its own (each call evicts 64)."""
    bs = 4096
    n_present = 1000
    prometheus_client: Any = None
    try:
        import prometheus_client
    except ImportError:
        res.note("overhead: prometheus_client is not installed (pip install 'dynblock[metrics]'): "
                 "no metrics-on case")
    variants = ["dynblock", "dynblock-s3fifo"] + (
        ["dynblock-metrics"] if prometheus_client is not None else [])
    hashes = np.arange(10_000, dtype=np.uint64) + np.uint64(1)
    src = aligned_empty(10_000 * bs)
    src[:] = 1
    one = aligned_empty(bs)
    progress.add(repeat * 5 * len(variants))

    def config(v: str, blocks: int) -> Config:
        eviction: Literal["lru", "s3fifo"] = "s3fifo" if v == "dynblock-s3fifo" else "lru"
        return Config(block_size=bs, host_blocks=blocks, numa_node=None, pin=False,
                      host_eviction=eviction)

    def build(opened: List[BlockManager]) -> Tuple[Dict[str, Dict[str, Any]], Any]:
        """Every variant's managers, filled, their calls by case, and a registry
        of the metrics variant's collectors (None without prometheus_client)."""
        managers = {v: BlockManager(config(v, 12000)) for v in variants}
        opened += managers.values()
        full = {v: BlockManager(config(v, 4096)) for v in variants}
        opened += full.values()
        registry = None
        if prometheus_client is not None:
            from ..metrics import register

            registry = prometheus_client.CollectorRegistry()
            register(managers["dynblock-metrics"], registry, store="bench")
            register(full["dynblock-metrics"], registry, store="bench-full")
        calls: Dict[str, Dict[str, Any]] = {}
        for v, m in managers.items():
            m.put(hashes, src)
            f = full[v]
            f.put(hashes[:4096] + np.uint64(1 << 40), src[:4096 * bs])
            fresh = iter(range(1 << 41, 1 << 62, 64))

            def put_new(f: BlockManager = f, fresh: Any = fresh) -> None:
                start = next(fresh)
                f.put(np.arange(start, start + 64, dtype=np.uint64), src[:64 * bs])

            calls[v] = {
                "match-10000-hashes": (lambda m=m: m.match(hashes), 10_000),
                "put-1000-present": (lambda m=m: m.put(hashes[:n_present], src[:n_present * bs]),
                                     n_present),
                "get-1-block-4KiB": (lambda m=m: m.get(hashes[:1], one), 1),
                "match-1-hash": (lambda m=m: m.match(hashes[:1]), 1),
                "put-64-new-evicting": (put_new, 64),
            }
        return calls, registry

    stop = threading.Event()
    # The registry to scrape while the metrics variant is timed, else None: a scrape (~1.5 ms
    # here, mostly prometheus_client's formatting, under the GIL) in another variant's window
    # would be noise in its comparison with LRU.
    scraping: List[Any] = [None]
    scraper = None
    opened: List[BlockManager] = []
    try:
        if prometheus_client is not None:

            def scrape() -> None:
                while not stop.wait(0.1):
                    registry = scraping[0]
                    if registry is not None:
                        prometheus_client.generate_latest(registry)

            scraper = threading.Thread(target=scrape, name="bench-scraper", daemon=True)
            scraper.start()
        # Each repeat makes its own managers (where a process's memory lands moved one case of
        # a manager by up to 15% against another's, for a whole run) and times every case in
        # OVERHEAD_ROUNDS rounds; a round times one window per variant, back to back, the
        # variants' order rotated from round to round. A ratio is the median of the rounds'
        # ratios: a slow stretch of a noisy machine (windows of the same calls took 25 or 40 us
        # each here, in stretches of tens of ms to seconds) falls on one round alike.
        for _ in range(repeat):
            calls, registry = build(opened)
            for name in calls["dynblock"]:
                for rnd in range(OVERHEAD_ROUNDS):
                    order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
                    for v in order:
                        fn, nh = calls[v][name]
                        scraping[0] = registry if v == "dynblock-metrics" else None
                        per_call = _window(fn)
                        scraping[0] = None
                        c = res.case("overhead", v, name, unit="us/call", hashes=nh)
                        c.values.append(per_call * 1e6)
                        c.extra = {"us_per_1000_hashes": c.median * 1000 / nh}
                for v in variants:
                    progress.step(f"overhead {v} {name}")
            while opened:
                opened.pop().close()
        # Calls per second against the base's, round by round: the base's times over v's.
        for base in res.cases:
            if base.workload == "overhead" and base.impl == "dynblock":
                for v, key in (("dynblock-s3fifo", "vs_lru"), ("dynblock-metrics", "vs_metrics_off")):
                    other = res.find("overhead", v, base.op, **base.params)
                    if other is not None:
                        other.ratios[key] = base.paired_ratio(other)
    finally:
        stop.set()
        if scraper is not None:
            scraper.join(timeout=10)
        for m in opened:
            m.close()


def default_directory() -> str:
    return tempfile.gettempdir()


def run_durability(res: Results, directory: str, block_size: int, working_bytes: int,
                   recovery_blocks: int, io_depth: Optional[int], batch_bytes: int, repeat: int,
                   progress: Progress) -> None:
    """Checksums on against off (disk-only manager, same run), and the time to
    reopen a persistent store of `recovery_blocks` blocks."""
    w = max(8, working_bytes // block_size)
    batch = max(1, batch_bytes // block_size)
    src = _rand(w * block_size, seed=11)
    out = _zeros(w * block_size)
    hashes = np.arange(1, w + 1, dtype=np.uint64)
    order = np.random.default_rng(11).permutation(w)
    p: Dict[str, Any] = dict(block_size=block_size, blocks=w)
    progress.add(repeat * 6)
    for _ in range(repeat):
        for checksums in (False, True):
            cfg = Config(block_size=block_size, disk_blocks=w, disk_dir=directory,
                         io_depth=io_depth, checksums=checksums)
            with BlockManager(cfg) as m:
                def put_all() -> None:
                    for i in range(0, w, batch):
                        m.put(hashes[i:i + batch], src[i * block_size:(i + batch) * block_size])

                def get_all() -> None:
                    for i in range(0, w, batch):
                        idx = order[i:i + batch]
                        if m.get(hashes[idx], out[i * block_size:(i + len(idx)) * block_size]) != len(idx):
                            raise RuntimeError("a stored block was not found")

                name = "checksums-on" if checksums else "checksums-off"
                res.case("durability", name, "put", **p).add_rate(w * block_size, timed(put_all))
                progress.step(f"durability put {name}")
                res.case("durability", name, "get", **p).add_rate(w * block_size, timed(get_all))
                progress.step(f"durability get {name}")
            # Puts into a full host tier (a quarter of the blocks) whose victims go to disk:
            # a block's checksum is taken while it is copied into the host tier, and its
            # disk write reuses it.
            hw = max(1, w // 4)
            cfg = Config(block_size=block_size, host_blocks=hw, disk_blocks=w, disk_dir=directory,
                         io_depth=io_depth, checksums=checksums, write_behind=False)
            with BlockManager(cfg) as m:
                for i in range(0, hw, batch):  # fill the host tier, untimed
                    n = min(batch, hw - i)
                    m.put(hashes[i:i + n] + np.uint64(w), src[i * block_size:(i + n) * block_size])

                def put_offloading() -> None:
                    for i in range(0, w, batch):
                        m.put(hashes[i:i + batch], src[i * block_size:(i + batch) * block_size])

                res.case("durability", name, "put-offloading", **p).add_rate(
                    w * block_size, timed(put_offloading))
                if m.stats()["offloaded_blocks"] != w:
                    raise RuntimeError(f"expected {w} offloads: {m.stats()['offloaded_blocks']}")
                progress.step(f"durability put-offloading {name}")
    # `python -m dynblock.store verify` of a persistent store of the same blocks, against the
    # cold reads with checksums above.
    from .. import store as store_tool

    vpath = os.path.join(directory, f".dynblock-bench-verify-{os.getpid()}.bin")
    progress.add(repeat + 1)
    try:
        vcfg = Config(block_size=block_size, disk_blocks=w, disk_path=vpath, persist=True,
                      io_depth=io_depth)
        with BlockManager(vcfg) as m:
            for i in range(0, w, batch):
                m.put(hashes[i:i + batch], src[i * block_size:(i + batch) * block_size])
        progress.step("durability: fill a store to verify")
        for _ in range(repeat):
            got: Dict[str, Any] = {}
            t = timed(lambda: got.update(store_tool.verify(vpath)))
            if got.get("checked") != w or not got.get("ok"):
                raise RuntimeError(f"store verify did not check every block: {got}")
            res.case("durability", "store-verify", "verify", **p).add_rate(w * block_size, t)
            progress.step("durability: store verify")
    finally:
        for f in (vpath, vpath + ".index", vpath + ".lock"):
            if os.path.exists(f):
                os.unlink(f)
    v = res.find("durability", "store-verify", "verify", **p)
    cold = res.find("durability", "checksums-on", "get", **p)
    assert v is not None and cold is not None
    v.ratios["vs_cold_get"] = v.median / cold.median
    for op in ("put", "get", "put-offloading"):
        on = res.find("durability", "checksums-on", op, **p)
        off = res.find("durability", "checksums-off", op, **p)
        assert on is not None and off is not None
        on.ratios["vs_checksums_off"] = on.median / off.median
        if on.cpu_s_per_gib is not None and off.cpu_s_per_gib:
            on.ratios["cpu_vs_checksums_off"] = on.cpu_s_per_gib / off.cpu_s_per_gib
    # Recovery of a persistent store.
    bs = 4096
    n = recovery_blocks
    path = os.path.join(directory, f".dynblock-bench-recovery-{os.getpid()}.bin")
    progress.add(repeat + 1)
    try:
        cfg = Config(block_size=bs, disk_blocks=n, disk_path=path, persist=True)
        with BlockManager(cfg) as m:
            chunk = 4096
            data = aligned_empty(chunk * bs)
            data[:] = 1
            for i in range(0, n, chunk):
                k = min(chunk, n - i)
                m.put(np.arange(i, i + k, dtype=np.uint64) + np.uint64(1), data[:k * bs])
        progress.step("durability: fill the persistent store")
        for _ in range(repeat):
            t = timed(lambda: BlockManager(cfg).close())
            c = res.case("durability", "dynblock", "reopen", unit="s", blocks=n, block_size=bs)
            c.values.append(t)
            with BlockManager(cfg) as m:
                c.extra = {"recovered_blocks": m.stats()["recovered_blocks"],
                           "index_bytes": os.path.getsize(path + ".index")}
            progress.step("durability: reopen")
    finally:
        for f in (path, path + ".index"):
            if os.path.exists(f):
                os.unlink(f)


def _p(values: List[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _tick_gaps(seconds: float, workers: List[Any]) -> List[float]:
    """The gaps of this thread ticking every 1 ms for `seconds` while each of `workers`
    (called with a stop event) runs on a thread of its own."""
    import threading

    stop = threading.Event()
    ths = [threading.Thread(target=w, args=(stop,)) for w in workers]
    for t in ths:
        t.start()
    gaps: List[float] = []
    last = time.perf_counter()
    end = last + seconds
    while last < end:
        time.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    stop.set()
    for t in ths:
        t.join(timeout=120)
    return gaps


def run_engine(res: Results, directory: str, repeat: int, progress: Progress,
               seconds: float = 2.0) -> None:
    """What a serving engine feels: lookup latency while another thread does disk I/O, how
    long a ticking Python thread stalls, a put into a full host tier (write-behind) against
    one into free slots, and 4 threads of async jobs against 1."""
    import threading

    progress.add(4 * repeat)
    bs = 2 << 20
    batch = aligned_empty(64 * bs)
    batch[:] = 1
    for rep in range(repeat):
        # 1. match of 32 hashes while another thread stores 128 MiB batches to disk.
        cfg = Config(block_size=bs, disk_blocks=256, disk_dir=directory, numa_node=None, pin=False)
        with BlockManager(cfg) as kv:
            kv.put(list(range(32)), batch[:32 * bs])
            stop = threading.Event()

            def store() -> None:
                h = 1000
                while not stop.is_set():
                    kv.put(list(range(h, h + 64)), batch)
                    h += 64

            w = threading.Thread(target=store)
            w.start()
            lat: List[float] = []
            q = list(range(32))
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                kv.match(q)
                lat.append(time.perf_counter() - t0)
                time.sleep(0.0005)
            stop.set()
            w.join(timeout=120)
        c = res.case("engine", "dynblock", "match-32-during-disk-puts", unit="ms p99")
        c.values.append(_p(lat, 0.99) * 1e3)
        c.extra = {"p50_ms": _p(lat, 0.5) * 1e3, "max_ms": max(lat) * 1e3, "calls": len(lat)}
        progress.step("engine match during puts")

        # 2. The longest gap of a Python thread ticking every 1 ms while another thread puts
        #    and gets 128 MiB batches through a host and a disk tier.
        cfg = Config(block_size=bs, host_blocks=32, disk_blocks=256, disk_dir=directory,
                     numa_node=None, pin=False)
        out = aligned_empty(64 * bs)
        out[:] = 0
        with BlockManager(cfg) as kv:

            def churn(stop: threading.Event) -> None:
                h = 0
                while not stop.is_set():
                    kv.put(list(range(h, h + 64)), batch)
                    kv.get(list(range(h, h + 64)), out)
                    h += 64

            gaps = _tick_gaps(seconds, [churn])
        c = res.case("engine", "python-thread", "tick-gap-during-puts-gets", unit="ms max")
        c.values.append(max(gaps) * 1e3)
        c.extra = {"p99_ms": _p(gaps, 0.99) * 1e3}
        # The machine's floor: the same ticker while two threads copy 128 MiB with numpy
        # (which releases the GIL), i.e. two busy threads that are not dynblock's.
        na, nb = aligned_empty(64 * bs), aligned_empty(64 * bs)
        na[:] = 1
        nb[:] = 0

        def copies(stop: threading.Event) -> None:
            while not stop.is_set():
                np.copyto(nb, na)

        gaps = _tick_gaps(seconds, [copies, copies])
        c = res.case("engine", "numpy-copyto-2threads", "tick-gap-during-copies", unit="ms max")
        c.values.append(max(gaps) * 1e3)
        c.extra = {"p99_ms": _p(gaps, 0.99) * 1e3}
        progress.step("engine GIL stall")

        # 3. p99 of a 32-block put (256 KiB blocks) into free host slots vs into a full host
        #    tier whose victims write-behind keeps on disk; puts 4 ms apart, as engine steps.
        sbs = 256 << 10
        src = aligned_empty(32 * sbs)
        src[:] = 2
        p99 = {}
        puts = 60
        # The disk tier holds what the full host tier evicts: its 256 blocks and every put.
        disk_blocks = 256 + 32 * puts + 64
        for label, host_blocks in (("free", 32 * puts), ("full", 256)):
            cfg = Config(block_size=sbs, host_blocks=host_blocks, disk_blocks=disk_blocks,
                         disk_dir=directory, numa_node=None, pin=False)
            with BlockManager(cfg) as kv:
                # Touch every host slot first (the host reclaims idle pages), then empty it
                # ("free") or leave it full ("full").
                for h in range(0, host_blocks, 32):
                    kv.put(list(range(h, h + 32)), src)
                if label == "free":
                    kv.clear()
                kv.flush()
                times: List[float] = []
                h = 100_000
                for _i in range(puts):
                    t0 = time.perf_counter()
                    kv.put(list(range(h, h + 32)), src)
                    times.append(time.perf_counter() - t0)
                    h += 32
                    time.sleep(0.004)
            p99[label] = _p(times, 0.99) * 1e3
            c = res.case("engine", "dynblock", f"put-32-into-{label}-host-tier", unit="ms p99")
            c.values.append(p99[label])
        progress.step("engine put into a full host tier")

        # 4. Aggregate throughput of put_async+get_async from 4 threads vs 1, same bytes.
        cfg = Config(block_size=sbs, host_blocks=512, disk_blocks=2048, disk_dir=directory,
                     numa_node=None, pin=False)
        rounds = 48
        # One thread and four, in turns that swap from repeat to repeat; the ratio is the median
        # of each repeat's own (the runs are bound by the disk tier's writes, whose speed drifts
        # on a shared device).
        for threads in ((1, 4) if rep % 2 == 0 else (4, 1)):
            with BlockManager(cfg) as kv:
                dsts = [aligned_empty(32 * sbs) for _ in range(threads)]
                for d in dsts:
                    d[:] = 0

                def jobs(t: int) -> None:
                    for r in range(t, rounds, threads):
                        hs = list(range(r * 32, r * 32 + 32))
                        kv.put_async(hs, src).wait(timeout=120)
                        kv.get_async(hs, dsts[t]).wait(timeout=120)

                ts = [threading.Thread(target=jobs, args=(t,)) for t in range(threads)]

                def run_all() -> None:
                    for t in ts:
                        t.start()
                    for t in ts:
                        t.join(timeout=300)

                dt = timed(run_all)
            c = res.case("engine", "dynblock", "async-put-get", threads=threads)
            c.add_rate(2 * rounds * 32 * sbs, dt)
        progress.step("engine async threads")

    m = res.find("engine", "dynblock", "match-32-during-disk-puts")
    if m is not None and m.values:
        m.ratios["goal_1ms_over_p99"] = 1.0 / m.median if m.median > 0 else float("inf")
    g = res.find("engine", "python-thread", "tick-gap-during-puts-gets")
    if g is not None and g.values:
        g.ratios["goal_5ms_over_max"] = 5.0 / g.median if g.median > 0 else float("inf")
        floor = res.find("engine", "numpy-copyto-2threads", "tick-gap-during-copies")
        if floor is not None and floor.values and g.median > 0:
            g.ratios["vs_numpy_copies"] = floor.median / g.median
    free = res.find("engine", "dynblock", "put-32-into-free-host-tier")
    full = res.find("engine", "dynblock", "put-32-into-full-host-tier")
    if free is not None and full is not None and free.values and full.values:
        full.ratios["free_over_full"] = free.median / full.median
    one = res.find("engine", "dynblock", "async-put-get", threads=1)
    four = res.find("engine", "dynblock", "async-put-get", threads=4)
    if one is not None and four is not None and four.values:
        four.ratios["vs_1_thread"] = four.paired_ratio(one)
