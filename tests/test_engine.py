"""What a serving engine calls: blocks gathered from and scattered to rows of
one large KV buffer, hashes of every integer kind at every entry point, a
batch that never evicts its own blocks, and the cache's own memory refused
as a source or destination."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynblock import BlockManager, Config
from conftest import fill_up

BS = 4096


def data_for(h: int, bs: int = BS) -> np.ndarray:
    return np.random.default_rng(h).integers(0, 256, size=bs, dtype=np.uint8)


def manager(tmp_path: Path, host: int, disk: int, bs: int = BS) -> BlockManager:
    return BlockManager(Config(block_size=bs, host_blocks=host, disk_blocks=disk,
                               disk_dir=str(tmp_path), numa_node=None, pin=False))


@settings(max_examples=40, deadline=None)
@given(n_rows=st.integers(1, 48), data=st.data())
def test_rows_gather_and_scatter_byte_exact(tmp_path_factory, n_rows: int, data) -> None:
    # Blocks are put from random rows of one large buffer and come back into random, distinct
    # rows of another, through the host tier and (with a small host tier) the disk tier.
    k = data.draw(st.integers(1, n_rows), label="blocks")
    src_rows = data.draw(st.lists(st.integers(0, n_rows - 1), min_size=k, max_size=k), label="src rows")
    dst_rows = data.draw(st.permutations(range(n_rows)), label="dst rows")[:k]
    hashes = [1000 + i for i in range(k)]
    kv_src = np.random.default_rng(n_rows).integers(0, 256, size=n_rows * BS, dtype=np.uint8)
    with manager(tmp_path_factory.mktemp("rows"), host=max(1, k // 3), disk=2 * k) as kv:
        assert kv.put(hashes, kv_src, rows=src_rows) == k
        dst = np.zeros(n_rows * BS, np.uint8)
        assert kv.get(hashes, dst, rows=dst_rows) == k
        for i in range(k):
            got = dst[dst_rows[i] * BS:(dst_rows[i] + 1) * BS]
            want = kv_src[src_rows[i] * BS:(src_rows[i] + 1) * BS]
            assert np.array_equal(got, want), f"block {i}"
        untouched = sorted(set(range(n_rows)) - set(dst_rows))
        for r in untouched:
            assert not dst[r * BS:(r + 1) * BS].any()


def test_rows_in_a_2d_kv_buffer(tmp_path: Path) -> None:
    # An engine's paged KV buffer: [n_pages, block_size] of float16, blocks at page ids.
    pages = np.random.default_rng(1).standard_normal((32, BS // 2)).astype(np.float16)
    with manager(tmp_path, 8, 0) as kv:
        assert kv.put(np.array([7, 8, 9], np.uint64), pages, rows=np.array([30, 2, 17], np.int64)) == 3
        out = np.zeros_like(pages)
        assert kv.get([7, 8, 9, 10], out, rows=[0, 1, 5, 6]) == 3
        assert np.array_equal(out[[0, 1, 5]], pages[[30, 2, 17]])
        assert not out[6].any()


@pytest.mark.parametrize("call,exc,match", [
    (lambda kv, b: kv.get([1, 2], b, rows=[3, 3]), ValueError, r"rows\[0\] and rows\[1\] are both 3"),
    (lambda kv, b: kv.get([1, 2], b, rows=[0, 8]), IndexError, r"rows\[1\] is 8, out of range: dst holds 8 rows"),
    (lambda kv, b: kv.get([1, 2], b, rows=[0]), ValueError, "rows has 1 entries but hashes has 2"),
    (lambda kv, b: kv.get([1], b[:BS + 1], rows=[0]), ValueError, "not a whole number of rows"),
    (lambda kv, b: kv.put([5, 6], b, rows=[0, -1]), ValueError, r"rows\[1\] must be an integer in 0..2\*\*64, got -1"),
    (lambda kv, b: kv.put([5, 6], b, rows=[0, 9]), IndexError, r"rows\[1\] is 9"),
])
def test_bad_rows_are_refused_before_any_byte_moves(tmp_path: Path, call, exc, match) -> None:
    with manager(tmp_path, 4, 0) as kv:
        kv.put([1, 2], np.concatenate([data_for(1), data_for(2)]))
        before = (kv.lru_order(), kv.stats())
        buf = np.full(8 * BS, 0xAB, np.uint8)
        with pytest.raises(exc, match=match):
            call(kv, buf)
        assert (buf == 0xAB).all()
        assert (kv.lru_order(), kv.stats()) == before
        assert 5 not in kv and 6 not in kv


def test_a_batch_never_evicts_its_own_stored_blocks(tmp_path: Path) -> None:
    # Disk-only store of 2 blocks holding [1, 2]: put([3, 1]) refreshes 1 and evicts 2 for 3.
    with manager(tmp_path, 0, 2) as kv:
        kv.put([1, 2], np.concatenate([data_for(1), data_for(2)]))
        assert kv.put([3, 1], np.concatenate([data_for(3), data_for(1)])) == 1
        assert 2 not in kv and 1 in kv and 3 in kv
        out = np.zeros(BS, np.uint8)
        assert kv.get([1], out) == 1 and np.array_equal(out, data_for(1))
        assert kv.stats()["dropped_blocks"] == 1


@pytest.mark.parametrize("make", [
    lambda hs: list(hs),
    lambda hs: tuple(np.uint64(h) for h in hs),
    lambda hs: [np.int64(h) for h in hs],
    lambda hs: np.array(hs, dtype=np.uint64),
    lambda hs: np.array(hs, dtype=np.int64),
    lambda hs: np.array(hs, dtype=np.uint32),
])
def test_hashes_of_every_integer_kind_at_every_entry_point(tmp_path: Path, make) -> None:
    hs = [3, 1, 2]
    with manager(tmp_path, 4, 4) as kv:
        assert kv.put(make(hs), np.concatenate([data_for(h) for h in hs])) == 3
        assert kv.match(make(hs)) == 3
        out = np.zeros(3 * BS, np.uint8)
        assert kv.get(make(hs), out) == 3
        assert np.array_equal(out, np.concatenate([data_for(h) for h in hs]))
        for h in make(hs):
            assert kv.contains(h) and h in kv
        assert kv.remove(make(hs[:1])) == 1
        assert kv.match(make(hs)) == 0 and np.uint64(1) in kv


def test_a_manager_shows_every_read_only_attribute_of_its_tiers_and_nothing_more(tmp_path: Path) -> None:
    from dynblock import DiskStorage, HostStorage

    with manager(tmp_path, 4, 4) as kv:
        for view, tier, cls in ((kv.host, kv._host, HostStorage), (kv.disk, kv._disk, DiskStorage)):
            assert view is not None and len(cls.READ_ONLY) > 10
            for name in cls.READ_ONLY:
                assert getattr(view, name) == getattr(tier, name), name
                with pytest.raises(AttributeError, match="read-only"):
                    setattr(tier, name, 1)  # the tier's own attribute cannot be set either
            with pytest.raises(AttributeError, match="read-only"):
                _ = view.sync  # a call, not a read-only attribute


def test_the_cache_own_memory_is_refused(tmp_path: Path) -> None:
    with manager(tmp_path, 4, 0) as kv:
        kv.put([1], np.full(BS, 0x41, np.uint8))
        kv.put([2], np.full(BS, 0x42, np.uint8))
        assert kv.host is not None
        ro = kv.host.view()  # what the manager hands out is read-only
        assert ro.readonly
        with pytest.raises(TypeError):
            ro[0] = 1
        with pytest.raises(BufferError, match="read-only"):
            kv.get([2, 1], ro[:2 * BS])
        with pytest.raises(AttributeError, match="read-only"):
            kv.host.write_blocks([0], np.zeros(BS, np.uint8))
        # Memory of the tier itself (reachable only by holding the HostStorage) is refused too.
        view = kv._host.view()
        with pytest.raises(ValueError, match="overlaps the host tier's own memory"):
            kv.get([2, 1], view[:2 * BS])
        with pytest.raises(ValueError, match="overlaps the host tier's own memory"):
            kv.put([3], view[:BS])
        out = bytearray(BS)
        assert kv.get([1], out) == 1 and out[:1] == b"A"  # hash 1 still serves its own bytes
        assert 3 not in kv


class DlpackOnly:
    """Exposes an array through DLPack alone (no buffer protocol, no __array__), as a torch
    tensor does; numpy is the real producer behind it."""

    def __init__(self, a: np.ndarray) -> None:
        self.a = a

    def __dlpack__(self, **kw):
        return self.a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


def test_dlpack_tensors_round_trip_zero_copy(tmp_path: Path) -> None:
    import sys

    src = np.random.default_rng(3).standard_normal((2, BS // 4)).astype(np.float32)  # 2 blocks, 2-D
    dst = np.zeros_like(src)
    refs = sys.getrefcount(src), sys.getrefcount(dst)
    with manager(tmp_path, 4, 4) as kv:
        assert kv.put([1, 2], DlpackOnly(src)) == 2
        assert kv.get([1, 2], DlpackOnly(dst)) == 2
        assert np.array_equal(dst, src)  # written in place: the caller's memory, no copy
        rows = np.zeros((4, BS // 4), np.float32)
        assert kv.get([2, 1], DlpackOnly(rows), rows=[3, 0]) == 2
        assert np.array_equal(rows[3], src[1]) and np.array_equal(rows[0], src[0])
    assert (sys.getrefcount(src), sys.getrefcount(dst)) == refs  # every capsule's deleter ran


def test_dlpack_refusals_change_nothing(tmp_path: Path) -> None:
    with manager(tmp_path, 4, 0) as kv:
        kv.put([1], np.full(BS, 5, np.uint8))
        ro = np.zeros(BS, np.uint8)
        ro.flags.writeable = False
        with pytest.raises(BufferError, match="read-only"):
            kv.get([1], DlpackOnly(ro))
        assert kv.put([2], DlpackOnly(np.full(BS, 6, np.uint8)[:])) == 1  # read-only sources are fine
        strided = np.zeros(2 * BS, np.uint8)[::2]
        with pytest.raises(ValueError, match="contiguous"):
            kv.get([1], DlpackOnly(strided))
        assert not strided.any() and len(kv) == 2


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "float8_e5m2", "float16"])
def test_torch_tensors_of_kv_dtypes_round_trip_byte_exact(tmp_path: Path, dtype: str) -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed (it is optional)")
    if not hasattr(torch, dtype):
        pytest.skip(f"this torch has no {dtype}")
    n = BS  # elements: bytes differ per dtype, block_size follows
    t = torch.randn(2, n).to(getattr(torch, dtype))
    bs = t[0].numel() * t.element_size()
    with BlockManager(Config(block_size=bs, host_blocks=4, disk_blocks=4, disk_dir=str(tmp_path),
                             numa_node=None, pin=False)) as kv:
        assert kv.put([1, 2], t) == 2
        out = torch.zeros_like(t)
        assert kv.get([1, 2], out) == 2
        assert torch.equal(out.view(torch.uint8), t.view(torch.uint8))
        with pytest.raises(ValueError, match="contiguous"):
            kv.get([1], torch.zeros(2, n, dtype=t.dtype).t())


def test_a_leased_get_returns_its_count_under_eviction_pressure(tmp_path: Path) -> None:
    # Other threads fill a small cache as fast as they can (every put evicts); leased loads
    # always get their whole prefix, byte-exact. Bounded in time; every join has a timeout.
    import threading
    import time

    stop = threading.Event()
    errors: list = []

    def churn(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                hs = [int(x) for x in rng.integers(10_000, 10_000_000, size=4)]
                kv.put(hs, np.concatenate([data_for(h) for h in hs]))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    with manager(tmp_path, host=6, disk=6) as kv:
        threads = [threading.Thread(target=churn, args=(s,)) for s in range(2)]
        for t in threads:
            t.start()
        loads = 0
        deadline = time.monotonic() + 3
        try:
            while time.monotonic() < deadline:
                hs = [loads * 4 + k for k in range(4)]
                kv.put(hs, np.concatenate([data_for(h) for h in hs]))
                with kv.lookup(hs) as lease:
                    time.sleep(0.001)  # the churn threads run meanwhile
                    out = np.zeros(lease.count * BS, np.uint8)
                    assert kv.get(lease, out) == lease.count
                    for i in range(lease.count):
                        assert np.array_equal(out[i * BS:(i + 1) * BS], data_for(hs[i]))
                loads += 1
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
        assert not errors and not any(t.is_alive() for t in threads)
        assert loads > 10
        assert kv.stats()["leases"] == loads


def test_lease_api(tmp_path: Path) -> None:
    with manager(tmp_path, 4, 0) as kv, manager(tmp_path, 4, 0) as other:
        kv.put([1, 2], np.concatenate([data_for(1), data_for(2)]))
        lease = kv.lookup([1, 2, 3])
        assert lease.count == 2 and lease.active
        with pytest.raises(ValueError, match="another BlockManager"):
            other.get(lease, np.zeros(2 * BS, np.uint8))
        with pytest.raises(ValueError, match="need exactly"):  # bad dst: the lease stays usable
            kv.get(lease, np.zeros(BS, np.uint8))
        rows = np.zeros(4 * BS, np.uint8)
        assert kv.get(lease, rows, rows=[3, 1]) == 2
        assert np.array_equal(rows[3 * BS:], data_for(1)) and np.array_equal(rows[BS:2 * BS], data_for(2))
        assert not lease.active
        with pytest.raises(ValueError, match="already used or released"):
            kv.get(lease, np.zeros(2 * BS, np.uint8))
        # Every host slot leased: a put stores nothing, counts it, raises nothing.
        with kv.lookup([1, 2]), kv.lookup([1]):
            kv.put([3, 4], np.concatenate([data_for(3), data_for(4)]))
            with kv.lookup([1, 2, 3, 4]) as full:
                assert full.count == 4
                assert kv.put([5], data_for(5)) == 0
                assert kv.stats()["rejected_full"] == 1
        assert kv.put([5], data_for(5)) == 1  # released: room again
        gone = kv.lookup([5])
        del gone  # garbage collection releases a forgotten lease
        import gc

        gc.collect()
        assert kv.put([6, 7, 8, 9], np.concatenate([data_for(h) for h in (6, 7, 8, 9)])) == 4


# --- asynchronous jobs -----------------------------------------------------------


def test_a_get_job_waits_for_earlier_puts_of_its_hashes(tmp_path: Path) -> None:
    # Many puts and gets submitted back to back without waiting: every get sees the put
    # submitted before it, although jobs run side by side.
    with manager(tmp_path, 64, 256) as kv:
        gets = []
        for r in range(40):
            hs = [r * 4 + k for k in range(4)]
            kv.put_async(hs, np.concatenate([data_for(h) for h in hs]))
            out = np.zeros(4 * BS, np.uint8)
            gets.append((hs, out, kv.get_async(hs, out)))
        for hs, out, job in gets:
            assert job.wait(timeout=60) == 4
            assert np.array_equal(out, np.concatenate([data_for(h) for h in hs]))
        kv.wait_all(timeout=60)
        assert not kv._inflight  # bookkeeping emptied as jobs finish


def test_jobs_run_in_the_background_and_a_get_after_a_put_sees_it(tmp_path: Path) -> None:
    with manager(tmp_path, 4, 16) as kv:
        src = np.concatenate([data_for(h) for h in range(8)])
        put = kv.put_async(list(range(8)), src)
        out = np.zeros(8 * BS, np.uint8)
        get = kv.get_async(list(range(8)), out)  # submitted before the put is known to be done
        assert get.wait(timeout=30) == 8 and put.wait(timeout=30) == 8
        assert put.done() and get.done()
        assert np.array_equal(out, src)
        lease = kv.lookup(list(range(8)))
        rows = np.zeros(16 * BS, np.uint8)
        assert kv.get_async(lease, rows, rows=list(range(15, 7, -1))).wait(timeout=30) == 8
        assert np.array_equal(rows[15 * BS:], data_for(0)) and not lease.active


def test_a_job_reraises_its_error_and_the_manager_goes_on(tmp_path: Path) -> None:
    with manager(tmp_path, 4, 0) as kv:
        bad = kv.put_async([1, 2], np.zeros(BS, np.uint8))
        with pytest.raises(ValueError, match="need exactly"):
            bad.wait(timeout=30)
        assert kv.put_async([1], data_for(1)).wait(timeout=30) == 1


def test_done_callbacks_see_results_and_errors(tmp_path: Path) -> None:
    seen: list = []
    done = threading.Event()

    def record(job) -> None:
        try:
            seen.append(job.wait(0))
        except ValueError as e:
            seen.append(str(e))
        if len(seen) == 2:
            done.set()

    with manager(tmp_path, 4, 0) as kv:
        kv.put_async([1, 2], np.concatenate([data_for(1), data_for(2)])).add_done_callback(record)
        kv.put_async([3, 4], np.zeros(BS, np.uint8)).add_done_callback(record)  # too short
        assert done.wait(timeout=30)
        assert 2 in seen and any("need exactly" in str(x) for x in seen)
        finished = kv.put_async([5], data_for(5))
        finished.wait(timeout=30)
        late: list = []
        finished.add_done_callback(lambda j: late.append(j.wait(0)))  # already done: at once
        assert late == [1]


def test_jobs_in_asyncio(tmp_path: Path) -> None:
    import asyncio

    async def main(kv: BlockManager) -> int:
        await kv.put_async([1, 2], np.concatenate([data_for(1), data_for(2)]))
        out = np.zeros(2 * BS, np.uint8)
        n = await kv.get_async([1, 2], out)
        assert np.array_equal(out[BS:], data_for(2))
        return n

    with manager(tmp_path, 4, 0) as kv:
        assert asyncio.run(main(kv)) == 2


def test_wait_timeouts_and_close_waits_for_pending_jobs(tmp_path: Path) -> None:
    import threading

    gate = threading.Event()
    kv = manager(tmp_path, 4, 0)
    # Real jobs that hold every worker until the gate opens.
    blockers = [kv._submit("test", gate.wait, 30) for _ in range(BlockManager.JOB_WORKERS)]
    queued = kv.put_async([1], data_for(1))
    with pytest.raises(TimeoutError, match="not done after 0.05 s"):
        queued.wait(timeout=0.05)
    with pytest.raises(TimeoutError, match=f"{BlockManager.JOB_WORKERS + 1} job"):
        kv.wait_all(timeout=0.05)
    assert not queued.done()
    gate.set()
    kv.wait_all(timeout=30)
    assert all(b.done() for b in blockers) and queued.wait(timeout=0) == 1
    late = kv.put_async([2], data_for(2))
    kv.close()  # waits for it
    assert late.done() and late.wait(timeout=0) == 1


def test_eight_threads_mixing_jobs_leases_removes_and_clears(tmp_path: Path) -> None:
    # Bounded in time; content derived from each hash; every wait has a timeout.
    import threading
    import time

    stop = time.monotonic() + 3
    wrong: list = []
    errors: list = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            while time.monotonic() < stop:
                hs = [int(x) for x in rng.integers(0, 64, size=int(rng.integers(1, 6)))]
                op = int(rng.integers(0, 10))
                if op < 4:
                    kv.put_async(hs, np.concatenate([data_for(h) for h in hs])).wait(timeout=30)
                elif op < 7:
                    out = np.zeros(len(hs) * BS, np.uint8)
                    n = kv.get_async(hs, out).wait(timeout=30)
                    wrong.extend(h for i, h in enumerate(hs[:n])
                                 if not np.array_equal(out[i * BS:(i + 1) * BS], data_for(h)))
                elif op < 9:
                    with kv.lookup(hs) as lease:
                        out = np.zeros(max(lease.count, 1) * BS, np.uint8)
                        n = kv.get(lease, out[:lease.count * BS])
                        assert n <= lease.count
                        wrong.extend(h for i, h in enumerate(hs[:n])
                                     if not np.array_equal(out[i * BS:(i + 1) * BS], data_for(h)))
                elif rng.integers(0, 20) == 0:
                    kv.clear()
                else:
                    kv.remove(hs)
        except Exception as e:
            errors.append(e)

    with manager(tmp_path, host=8, disk=16) as kv:
        threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a worker hung"
        assert not errors, errors[:3]
        assert not wrong, f"{len(wrong)} blocks came back with other bytes"
        kv.wait_all(timeout=30)


def test_jobs_in_a_forked_child_raise_fork_error(tmp_path: Path) -> None:
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import os, numpy as np, dynblock
        kv = dynblock.BlockManager(dynblock.Config(block_size=4096, host_blocks=4, disk_blocks=4,
                                   disk_dir={str(tmp_path)!r}, numa_node=None, pin=False))
        kv.put_async([1], np.ones(4096, np.uint8)).wait(timeout=30)
        pid = os.fork()
        if pid == 0:
            try:
                kv.put_async([2], np.ones(4096, np.uint8))
                os._exit(3)
            except dynblock.ForkError:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert kv.put_async([2], np.ones(4096, np.uint8)).wait(timeout=30) == 1
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


# --- write-behind ----------------------------------------------------------------


def test_write_behind_cleans_host_blocks_ahead_of_eviction(tmp_path: Path) -> None:
    import time

    with BlockManager(Config(block_size=BS, host_blocks=64, disk_blocks=256, disk_dir=str(tmp_path),
                             numa_node=None, pin=False)) as kv:
        assert kv.config.write_behind  # the default with both tiers
        kv.put(list(range(64)), np.concatenate([data_for(h) for h in range(64)]))
        kv.flush()
        s = kv.stats()
        assert s["written_behind"] >= 16 and s["disk_blocks_used"] >= 16  # the LRU quarter
        host, disk = kv.lru_order()
        assert host[:16] == list(range(16)) and set(range(16)) <= set(disk)
        # Evicting clean blocks writes nothing in the put: its victims are already on disk. (Every
        # offload is counted in offloaded_blocks; the background's are also in written_behind.)
        def synchronous_offloads() -> int:
            st = kv.stats()
            return st["offloaded_blocks"] - st["written_behind"]

        before = synchronous_offloads()
        kv.put(list(range(100, 108)), np.concatenate([data_for(h) for h in range(100, 108)]))
        assert kv.stats()["host_evictions"] >= 8
        assert synchronous_offloads() == before
        out = np.zeros(64 * BS, np.uint8)
        assert kv.get(list(range(64)), out) == 64
        assert np.array_equal(out, np.concatenate([data_for(h) for h in range(64)]))
        # The background thread keeps up by itself too (bounded wait, no timing assert).
        kv.put(list(range(200, 264)), np.concatenate([data_for(h) for h in range(200, 264)]))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and kv.stats()["written_behind"] < s["written_behind"] + 16:
            time.sleep(0.01)
        assert kv.stats()["written_behind"] >= s["written_behind"] + 16


def test_write_behind_is_optional_and_close_stops_it(tmp_path: Path) -> None:
    import threading

    with BlockManager(Config(block_size=BS, host_blocks=16, disk_blocks=16, disk_dir=str(tmp_path),
                             numa_node=None, pin=False, write_behind=False)) as kv:
        kv.put(list(range(16)), np.concatenate([data_for(h) for h in range(16)]))
        kv.flush()
        assert kv.stats()["written_behind"] == 0 and kv.stats()["disk_blocks_used"] == 0
    names = {t.name for t in threading.enumerate()}
    kv = BlockManager(Config(block_size=BS, host_blocks=16, disk_blocks=16, disk_dir=str(tmp_path),
                             numa_node=None, pin=False))
    kv.put([1], data_for(1))
    kv.close()
    assert {t.name for t in threading.enumerate()} == names  # no thread left behind


def test_a_failed_write_behind_loses_nothing_and_breaks_nothing(tiny_tmpfs: Path, caplog) -> None:
    import logging

    bs = 1 << 20
    cfg = Config(block_size=bs, host_blocks=8, disk_blocks=12, disk_dir=str(tiny_tmpfs),
                 numa_node=None, pin=False, preallocate="sparse")
    with BlockManager(cfg) as kv:
        filler = fill_up(tiny_tmpfs)  # the sparse disk tier has nowhere to go
        blocks = [np.random.default_rng(h).integers(0, 256, bs, dtype=np.uint8) for h in range(8)]
        with caplog.at_level(logging.WARNING, logger="dynblock"):
            assert kv.put(list(range(8)), np.concatenate(blocks)) == 8
            kv.flush()  # the background step fails with ENOSPC
            s = kv.stats()
            assert s["failed_write_behind"] >= 1 and s["written_behind"] == 0
            out = np.zeros(8 * bs, np.uint8)
            assert kv.get(list(range(8)), out) == 8  # still served from the host tier
            assert np.array_equal(out, np.concatenate(blocks))
        assert sum("ahead of eviction failed" in r.getMessage() for r in caplog.records) == 1
        filler.unlink()
        kv.flush()  # space again: the same blocks are written behind now
        assert kv.stats()["written_behind"] >= 2


def _worker_values(tmp_path: Path, nice: int, read: Callable[[int], Any],
                   **config: Any) -> Dict[str, Any]:
    """`read(tid)` of each of dynblock's worker threads (by name) while a manager with
    `worker_nice=nice` that has put, written behind and read is open."""
    cfg = Config(block_size=BS, host_blocks=4, disk_blocks=16, disk_dir=str(tmp_path),
                 numa_node=None, pin=False, worker_nice=nice, **config)
    with BlockManager(cfg) as kv:
        kv.put(list(range(8)), np.concatenate([data_for(h) for h in range(8)]))
        kv.flush()
        out = np.zeros(8 * BS, np.uint8)
        assert kv.get(list(range(8)), out) == 8
        seen = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/comm") as f:
                    name = f.read().strip()
                value = read(int(tid))
            except (FileNotFoundError, ProcessLookupError):
                continue
            if name.startswith("dynblock-") and not name.startswith("dynblock-job"):
                seen[name] = value
    kinds = {n.split("-")[1] for n in seen}
    assert {"copy", "io", "writeb"} <= kinds, seen  # comm is cut at 15 bytes: "dynblock-writeb"
    return seen


@pytest.mark.parametrize("nice", [0, 7])
def test_worker_threads_run_at_worker_nice(tmp_path: Path, nice: int) -> None:
    seen = _worker_values(tmp_path, nice, lambda tid: os.getpriority(os.PRIO_PROCESS, tid))
    assert set(seen.values()) == {max(nice, os.getpriority(os.PRIO_PROCESS, 0))}, seen
    with pytest.raises(ValueError, match="worker_nice .* must be between 0 and 19, got 20"):
        Config(block_size=BS, host_blocks=4, worker_nice=20)


def _slice_ns(tid: int) -> Optional[int]:
    """A thread's EEVDF time slice from /proc (None where the kernel does not show it)."""
    try:
        with open(f"/proc/self/task/{tid}/sched") as f:
            for line in f:
                if line.startswith("se.slice"):
                    return int(line.split()[-1])
    except FileNotFoundError:
        pass
    return None


def _custom_slices() -> bool:
    """Whether a thread may set its own time slice: Linux 6.12+, whose /proc shows it."""
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    new_enough = m is not None and (int(m.group(1)), int(m.group(2))) >= (6, 12)
    return new_enough and _slice_ns(threading.get_native_id()) is not None


@pytest.mark.skipif(not _custom_slices(),
                    reason=f"kernel {os.uname().release} has no per-thread time slice (Linux 6.12+ "
                           "shows se.slice in /proc/PID/sched and honours sched_setattr's)")
@pytest.mark.parametrize("nice", [0, 7])
def test_worker_threads_take_a_long_time_slice(tmp_path: Path, nice: int) -> None:
    # With worker_nice above 0 the workers ask for a 10 ms slice, longer than the default
    # (0.7-3 ms): an engine thread that wakes on a busy core then preempts them at once
    # instead of waiting for the next tick. With 0 they keep the caller's slice.
    mine = _slice_ns(threading.get_native_id())
    slices = _worker_values(tmp_path, nice, _slice_ns, disk_engine="threads")
    assert set(slices.values()) == {10_000_000 if nice > 0 else mine}, slices
