"""Durability: checksums, the persistent store across restarts and kill -9,
and real faults (flipped bytes, torn index, ENOSPC)."""

from __future__ import annotations

import errno
import gc
import logging
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import List

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dynblock
from dynblock import BlockManager, KvLayout, StoreLockedError
from conftest import fill_up, needs_root, run_py, shim_env

BS = 4096


def data_for(h: int, bs: int = BS) -> np.ndarray:
    return np.random.default_rng(h).integers(0, 256, size=bs, dtype=np.uint8)


def blocks(hs: List[int], bs: int = BS) -> np.ndarray:
    return np.concatenate([data_for(h, bs) for h in hs])


def open_store(path: Path, disk_blocks: int = 16, host_blocks: int = 0, **kw) -> BlockManager:
    kw.setdefault("block_size", BS)
    return BlockManager.open(str(path), disk_blocks=disk_blocks, host_blocks=host_blocks,
                             numa_node=None, pin=False, **kw)


def get_one(m: BlockManager, h: int, bs: int = BS):
    out = np.zeros(bs, np.uint8)
    return out if m.get([h], out) == 1 else None


def flip(path: Path, offset: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        b = bytearray(os.pread(fd, 1, offset))
        b[0] ^= 0xFF
        os.pwrite(fd, bytes(b), offset)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_store_survives_restart(tmp_path: Path) -> None:
    path = tmp_path / "kv.bin"
    with open_store(path) as m:
        assert m.persistent and m.stats()["recovered_blocks"] == 0
        assert m.put([1, 2, 3], blocks([1, 2, 3])) == 3
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(str(path) + ".index").st_mode) == 0o600
    with open_store(path) as m:
        assert m.stats()["recovered_blocks"] == 3 and len(m) == 3
        out = np.zeros(3 * BS, np.uint8)
        assert m.get([1, 2, 3], out) == 3 and np.array_equal(out, blocks([1, 2, 3]))
        assert m.remove([2]) == 1
    with open_store(path) as m:
        assert 2 not in m and m.match([1, 3]) == 2


def test_flipped_bytes_are_detected_counted_and_never_returned(tmp_path: Path, caplog) -> None:
    path = tmp_path / "kv.bin"
    with open_store(path) as m:
        m.put([10, 11, 12], blocks([10, 11, 12]))  # disk-only: slots 0, 1, 2
        slot1 = m.disk.data_offset + 1 * m.disk.slot_stride
    flip(path, slot1 + 100)
    with caplog.at_level(logging.WARNING, logger="dynblock"):
        with open_store(path) as m:
            out = np.zeros(3 * BS, np.uint8)
            assert m.get([10, 11, 12], out) == 1  # the prefix ends before the corrupt block
            assert np.array_equal(out[:BS], data_for(10))
            assert m.stats()["corrupt_blocks"] == 1
            assert 11 not in m and get_one(m, 11) is None
            assert np.array_equal(get_one(m, 12), data_for(12))
    msgs = [r.getMessage() for r in caplog.records if "checksum" in r.getMessage()]
    assert len(msgs) == 1 and "0x000000000000000b" in msgs[0] and "slot 1" in msgs[0]
    with open_store(path) as m:  # the drop was recorded in the index
        assert 11 not in m and len(m) == 2


def test_flip_under_a_running_manager(tmp_path: Path) -> None:
    path = tmp_path / "kv.bin"
    with open_store(path) as m:
        m.put([5], data_for(5))
        flip(path, m.disk.data_offset + 7)
        assert get_one(m, 5) is None and m.stats()["corrupt_blocks"] == 1


@pytest.mark.parametrize("engine", ["io_uring", "threads"])
def test_flips_in_a_large_batch_are_each_caught(tmp_path: Path, engine: str) -> None:
    # 24 blocks of 1 MiB in one batch: more than a ring keeps in flight while
    # it checks reads (8 MiB), and enough arriving at once that the caller and
    # a pool thread check them together (on a machine of more than one core).
    bs, n = 1 << 20, 24
    hs = list(range(100, 100 + n))
    src = dynblock.aligned_empty(n * bs)
    src[:] = blocks(hs, bs)
    path = tmp_path / "kv.bin"
    with open_store(path, disk_blocks=n, block_size=bs, disk_engine=engine) as m:
        if m.stats()["disk"]["engine"] != engine:
            pytest.skip(f"the disk tier runs on {m.stats()['disk']['engine']} here, not {engine}")
        assert m.put(hs, src) == n  # disk-only: slots 0 to 23
        bad = [3, 11, 20]
        for slot in bad:
            flip(path, m.disk.data_offset + slot * m.disk.slot_stride + 4096 * slot + 5)
        order = list(reversed(hs))
        out = dynblock.aligned_empty(n * bs)
        assert m.get(order, out) == order.index(hs[20])  # the prefix before the first bad one
        assert m.stats()["corrupt_blocks"] == 3
        assert [h for h in hs if h not in m] == [hs[i] for i in bad]
        good = [h for h in hs if h in m]
        assert m.get(good, out[:len(good) * bs]) == len(good)
        assert np.array_equal(out[:len(good) * bs], blocks(good, bs))


@pytest.mark.parametrize("bs", [64 << 10, (3 << 20) + 4096])
def test_flips_are_caught_in_disk_hits_promoted_into_the_host_tier(tmp_path: Path,
                                                                   bs: int) -> None:
    # With a host tier, a disk hit is read straight into the host slot it is promoted to and
    # checked while it is copied out to the caller: a flipped byte anywhere in a block (one
    # piece of 64 KiB, or four pieces of at most 1 MiB) is still a miss, never wrong bytes,
    # and the block is gone from both tiers.
    n = 6
    hs = list(range(40, 40 + n))
    src = dynblock.aligned_empty(n * bs)
    src[:] = blocks(hs, bs)
    path = tmp_path / "kv.bin"
    with open_store(path, disk_blocks=n, block_size=bs) as m:
        assert m.put(hs, src) == n  # disk-only: slots 0 to 5
        stride, data = m.disk.slot_stride, m.disk.data_offset
    bad = {1: 7, 4: bs - 1}  # slot: offset of the flipped byte in the block
    for slot, off in bad.items():
        flip(path, data + slot * stride + off)
    with open_store(path, disk_blocks=n, host_blocks=n, block_size=bs) as m:
        out = dynblock.aligned_empty(n * bs)
        out[:] = 0
        assert m.get(hs, out) == 1  # the prefix ends before the first bad block
        assert np.array_equal(out[:bs], blocks(hs[:1], bs))
        s = m.stats()
        assert s["corrupt_blocks"] == 2 and s["host_blocks_used"] == n - 2, s
        assert [h for h in hs if h not in m] == [hs[1], hs[4]]
        good = [h for h in hs if h in m]
        before = m.stats()["host_hits"]
        assert m.get(good, out[:len(good) * bs]) == len(good)  # promoted: host hits now
        assert np.array_equal(out[:len(good) * bs], blocks(good, bs))
        assert m.stats()["host_hits"] - before == len(good)


def test_checksums_can_be_turned_off(tmp_path: Path) -> None:
    path = tmp_path / "kv.bin"
    with open_store(path, checksums=False) as m:
        m.put([5], data_for(5))
        slot0 = m.disk.data_offset
    flip(path, slot0 + 7)
    with open_store(path, checksums=False) as m:
        got = get_one(m, 5)
        assert got is not None and not np.array_equal(got, data_for(5))  # no check: bytes as stored
        assert m.stats()["corrupt_blocks"] == 0
    with pytest.raises(ValueError, match="checksums false.*checksums true"):
        open_store(path, checksums=True)


def test_a_second_open_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "kv.bin"
    m = open_store(path)
    with pytest.raises(StoreLockedError, match="already open in this process"):
        open_store(path)
    code = (f"import dynblock; dynblock.BlockManager.open({str(path)!r}, block_size={BS}, "
            "disk_blocks=16, numa_node=None, pin=False)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0 and "StoreLockedError" in r.stderr
    m.close()
    open_store(path).close()  # free again once closed


def test_other_geometry_is_refused_naming_both(tmp_path: Path) -> None:
    path = tmp_path / "kv.bin"
    open_store(path, disk_blocks=8, block_size=8192).close()
    # same file size (8 x 8192 == 16 x 4096): the index tells them apart
    with pytest.raises(ValueError, match="block_size 8192.*block_size 4096"):
        open_store(path, disk_blocks=16, block_size=4096)
    with pytest.raises(ValueError, match="made with block_size 8192 and 8 blocks; this open asks "
                                         "for block_size 8192 and 4 blocks"):
        open_store(path, disk_blocks=4, block_size=8192)
    lay = KvLayout(2, 2, 16, 64, dtype="bfloat16")  # 8192 bytes
    lay2 = KvLayout(1, 2, 32, 64, dtype="bfloat16")  # also 8192 bytes
    p2 = tmp_path / "lay.bin"
    BlockManager.open(str(p2), layout=lay, disk_blocks=4, numa_node=None, pin=False).close()
    with pytest.raises(ValueError, match="layout fingerprint"):
        BlockManager.open(str(p2), layout=lay2, disk_blocks=4, numa_node=None, pin=False)
    # per-layer stores (one block per layer of a KV block): same block size for a model of
    # another depth, but the depth is part of the identity
    p3 = tmp_path / "per-layer.bin"
    deep = KvLayout(8, 2, 16, 64, dtype="bfloat16", per_layer=True)
    BlockManager.open(str(p3), layout=deep, disk_blocks=4, numa_node=None, pin=False).close()
    shallow = KvLayout(4, 2, 16, 64, dtype="bfloat16", per_layer=True)
    assert shallow.block_size == deep.block_size == 4096
    with pytest.raises(ValueError, match="layout fingerprint"):
        BlockManager.open(str(p3), layout=shallow, disk_blocks=4, numa_node=None, pin=False)
    BlockManager.open(str(p3), layout=deep, disk_blocks=4, numa_node=None, pin=False).close()
    assert path.exists()  # a refused open never deletes the store


def test_unsafe_parent_directories_are_refused(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(ValueError, match="world-writable without the sticky bit"):
        open_store(open_dir / "kv.bin")
    assert os.listdir(open_dir) == []
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    open_store(sticky / "kv.bin").close()
    if os.geteuid() == 0:
        other = tmp_path / "other"
        other.mkdir()
        os.chown(other, 12345, 12345)
        with pytest.raises(ValueError, match="owned by uid 12345"):
            open_store(other / "kv.bin")


def test_truncated_index_recovers_the_complete_records(tmp_path: Path, caplog) -> None:
    path = tmp_path / "kv.bin"
    with open_store(path) as m:
        for h in range(1, 6):
            m.put([h], data_for(h))
    index = Path(str(path) + ".index")
    size = index.stat().st_size
    os.truncate(index, size - 32 - 5)  # the close marker gone, the last PUT torn
    with caplog.at_level(logging.WARNING, logger="dynblock"):
        with open_store(path) as m:
            s = m.stats()
            assert s["recovered_blocks"] == 4 and s["index_torn_bytes"] == 27
            for h in range(1, 5):
                assert np.array_equal(get_one(m, h), data_for(h))
            assert 5 not in m
    assert any("interrupted record" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("garbage", [b"", b"x" * 10, b"\0" * 64, os.urandom(4096)])
def test_garbage_index_is_refused_or_rebuilt_clearly(tmp_path: Path, garbage: bytes) -> None:
    path = tmp_path / "kv.bin"
    with open_store(path) as m:
        m.put([1], data_for(1))
    Path(str(path) + ".index").write_bytes(garbage)
    if len(garbage) < 64:
        # Shorter than a header: a creation that died before its header was complete (no record
        # can follow an incomplete header), so nothing is lost by starting it anew.
        with open_store(path) as m:
            assert len(m) == 0
            m.put([2], data_for(2))
        with open_store(path) as m:
            assert len(m) == 1 and np.array_equal(get_one(m, 2), data_for(2))
        return
    with pytest.raises(ValueError, match="not a usable dynblock index"):
        open_store(path)


def test_write_through_makes_host_blocks_durable(tmp_path: Path) -> None:
    path = tmp_path / "kv.bin"
    with open_store(path, host_blocks=4, disk_blocks=16, write_through=True) as m:
        m.put([1, 2], blocks([1, 2]))
        assert m.stats()["host_blocks_used"] == 2 and m.stats()["disk_blocks_used"] == 2
    with open_store(path, host_blocks=4, disk_blocks=16, write_behind=False) as m:
        assert np.array_equal(get_one(m, 2), data_for(2))
    m = open_store(path, host_blocks=4, disk_blocks=16, write_behind=False)  # without: host blocks are not on disk
    m.put([3], data_for(3))
    m.close(flush=False)  # as a crash would leave it (a clean close writes them)
    with open_store(path, host_blocks=4, disk_blocks=16, write_behind=False) as m:
        assert 3 not in m and 1 in m


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(host=st.integers(1, 5), disk=st.integers(1, 7), write_behind=st.booleans(),
       offset=st.sampled_from([0, 1, 16]),
       ops=st.lists(st.tuples(st.booleans(), st.lists(st.integers(0, 11), min_size=1, max_size=6)),
                    min_size=1, max_size=25))
def test_write_through_stores_and_returns_every_blocks_own_bytes(
        tmp_path_factory, host, disk, write_behind, offset, ops) -> None:
    """write_through puts (each block copied into the host tier, then written to disk from its
    host slot with the copy's checksum) from aligned and unaligned buffers, mixed with gets
    that promote and evict, in tiers smaller than a batch: every get returns each block's own
    bytes, no checksum ever fails, and after a restart every block the disk tier holds comes
    back whole."""
    path = tmp_path_factory.mktemp("wt") / "kv.bin"
    kw = dict(host_blocks=host, disk_blocks=disk, write_through=True, write_behind=write_behind)
    with open_store(path, **kw) as m:
        for is_put, hs in ops:
            if is_put:
                raw = np.zeros(len(hs) * BS + offset, np.uint8)
                src = raw[offset:]
                src[:] = blocks(hs)
                m.put(hs, src)
            else:
                out = np.zeros(len(hs) * BS, np.uint8)
                n = m.get(hs, out)
                for i in range(n):
                    assert np.array_equal(out[i * BS:(i + 1) * BS], data_for(hs[i])), hs[i]
        assert m.stats()["corrupt_blocks"] == 0
    with open_store(path, **kw) as m:
        stored = [h for h in range(12) if h in m]
        assert len(stored) <= disk
        for h in stored:
            assert np.array_equal(get_one(m, h), data_for(h)), h
        assert m.stats()["corrupt_blocks"] == 0


def test_sync_durability_and_sync_call(tmp_path: Path) -> None:
    path = tmp_path / "kv.bin"
    with open_store(path, durability="sync") as m:
        m.put([1], data_for(1))
        m.sync()
    with open_store(path) as m:
        assert np.array_equal(get_one(m, 1), data_for(1))


def test_index_compaction_keeps_every_live_block(tmp_path: Path) -> None:
    path = tmp_path / "kv.bin"
    with open_store(path, disk_blocks=4) as m:
        for i in range(3000):  # far more records than live blocks
            m.put([i], data_for(i))
        assert m.stats()["index_compactions"] >= 1
    index_records = (Path(str(path) + ".index").stat().st_size - 64) // 32
    assert index_records < 3000
    with open_store(path, disk_blocks=4) as m:
        assert sorted(m.lru_order()[1]) == [2996, 2997, 2998, 2999]
        for h in (2996, 2999):
            assert np.array_equal(get_one(m, h), data_for(h))


# --- kill -9 at random points -------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys, numpy as np, dynblock
    path, disk_blocks, host_blocks, universe, seed, wt = sys.argv[1:7]
    disk_blocks, host_blocks, universe, seed = int(disk_blocks), int(host_blocks), int(universe), int(seed)
    m = dynblock.BlockManager.open(path, block_size=4096, disk_blocks=disk_blocks,
                                   host_blocks=host_blocks, write_through=wt == "1",
                                   numa_node=None, pin=False)
    rng = np.random.default_rng(seed)
    print("ready", flush=True)
    while True:
        hs = [int(x) for x in rng.choice(universe, size=int(rng.integers(1, 5)), replace=False)]
        src = np.concatenate([np.random.default_rng(h).integers(0, 256, size=4096, dtype=np.uint8) for h in hs])
        m.put(hs, src)
        print("ok", *hs, flush=True)
    """
)


def _kill_run(tmp_path: Path, it: int, disk_blocks: int, host_blocks: int, universe: int,
              write_through: bool) -> List[List[int]]:
    path = tmp_path / f"kv{it}.bin"
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(disk_blocks), str(host_blocks),
                          str(universe), str(it), "1" if write_through else "0"],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    time.sleep(random.Random(it).uniform(0.0, 0.25))
    p.send_signal(signal.SIGKILL)
    out = p.stdout.read()
    p.wait()
    return [[int(x) for x in line.split()[1:]] for line in out.splitlines() if line.startswith("ok ")]


def _verify_after_kill(path: Path, done: List[List[int]], disk_blocks: int, host_blocks: int,
                       universe: int, guaranteed: int) -> None:
    with open_store(path, disk_blocks=disk_blocks, host_blocks=host_blocks) as m:
        # every recovered block is byte for byte what was put
        for h in range(universe):
            if h in m:
                got = get_one(m, h)
                assert got is not None and np.array_equal(got, data_for(h)), f"block {h}"
        # the most recently completed distinct puts must all be there
        recent: List[int] = []
        for batch in reversed(done):
            for h in reversed(batch):
                if h not in recent:
                    recent.append(h)
        for h in recent[:guaranteed]:
            assert h in m, f"block {h} was put before the kill but not recovered"
        assert m.stats()["corrupt_blocks"] == 0  # ordering alone kept torn data out


@pytest.mark.parametrize("it", range(12))
def test_kill_9_disk_only_with_evictions(tmp_path: Path, it: int) -> None:
    disk_blocks, universe, max_batch = 24, 40, 4
    done = _kill_run(tmp_path, it, disk_blocks, 0, universe, False)
    # LRU keeps the last `disk_blocks` distinct blocks touched; the put that was
    # in flight at the kill may have evicted up to `max_batch` of them.
    _verify_after_kill(tmp_path / f"kv{it}.bin", done, disk_blocks, 0, universe, disk_blocks - max_batch)


@pytest.mark.parametrize("it", range(6))
def test_kill_9_write_through_keeps_every_completed_put(tmp_path: Path, it: int) -> None:
    universe = 40
    done = _kill_run(tmp_path, 100 + it, 64, 8, universe, True)
    _verify_after_kill(tmp_path / f"kv{100 + it}.bin", done, 64, 8, universe, universe)


def test_enospc_in_an_eviction_batch_leaves_the_store_consistent(tiny_tmpfs: Path) -> None:
    bs = 1 << 20
    path = tiny_tmpfs / "kv.bin"
    m = BlockManager.open(str(path), block_size=bs, disk_blocks=12, host_blocks=2, numa_node=None,
                          pin=False, preallocate="sparse")
    m.put([1, 2, 3], np.concatenate([data_for(h, bs) for h in (1, 2, 3)]))  # 1 offloaded
    filler = fill_up(tiny_tmpfs)
    with pytest.raises(OSError) as ei:
        m.put([4, 5, 6], np.concatenate([data_for(h, bs) for h in (4, 5, 6)]))
    assert ei.value.errno == errno.ENOSPC
    for h in (4, 5, 6):
        assert h not in m
    out = np.zeros(bs, np.uint8)
    assert m.get([1], out) == 1 and np.array_equal(out, data_for(1, bs))  # still serving
    m.close()
    filler.unlink()
    m = BlockManager.open(str(path), block_size=bs, disk_blocks=12, host_blocks=2, numa_node=None,
                          pin=False, preallocate="sparse")
    for h in range(1, 7):
        if h in m:
            assert m.get([h], out) == 1 and np.array_equal(out, data_for(h, bs))
    assert m.stats()["corrupt_blocks"] == 0
    m.close()


def test_clean_close_keeps_the_host_tier_of_a_persistent_store(tmp_path: Path) -> None:
    # About the flush at close: write-behind (background) would put blocks on disk earlier.
    path = tmp_path / "kv.bin"
    with open_store(path, host_blocks=16, disk_blocks=64, write_behind=False) as m:
        m.put(list(range(10)), blocks(list(range(10))))
        assert m.stats()["disk_blocks_used"] == 0  # host tier only, until close
    with open_store(path, host_blocks=16, disk_blocks=64, write_behind=False) as m:
        assert len(m) == 10
        for h in range(10):
            assert np.array_equal(get_one(m, h), data_for(h))
        m.put([20, 21], blocks([20, 21]))
        m.close(flush=False)  # asked not to: the new host-only blocks are not kept
    with open_store(path, host_blocks=16, disk_blocks=64, write_behind=False) as m:
        assert len(m) == 10 and 20 not in m


def test_close_keeps_the_most_recent_host_blocks_that_fit(tmp_path: Path) -> None:
    path = tmp_path / "kv.bin"
    with open_store(path, host_blocks=16, disk_blocks=4, write_behind=False) as m:
        m.put(list(range(10)), blocks(list(range(10))))
        m.get([2], np.zeros(BS, np.uint8))  # 2 becomes the most recent
    with open_store(path, host_blocks=16, disk_blocks=4) as m:
        assert sorted(h for h in range(10) if h in m) == [2, 7, 8, 9]
        assert m.lru_order()[1] == [7, 8, 9, 2]  # the disk tier keeps the host's recency order
        assert all(np.array_equal(get_one(m, h), data_for(h)) for h in (2, 7, 8, 9))


def test_write_behind_blocks_survive_kill_9_byte_exact(tmp_path: Path) -> None:
    # A writer with a host tier and write-behind (no write_through) is killed while the
    # background writer may be mid-batch: every block recovered from disk is byte-exact, and
    # after flush() the least recent host blocks are durable.
    path = tmp_path / "kv.bin"
    code = textwrap.dedent(f"""
        import numpy as np, os, signal, dynblock
        def data_for(h):
            return np.random.default_rng(h).integers(0, 256, size={BS}, dtype=np.uint8)
        m = dynblock.BlockManager.open({str(path)!r}, block_size={BS}, disk_blocks=64, host_blocks=32,
                                       numa_node=None, pin=False)
        m.put(list(range(32)), np.concatenate([data_for(h) for h in range(32)]))
        m.flush()
        print("flushed", m.stats()["written_behind"], flush=True)
        for h in range(32, 200):
            m.put([h], data_for(h))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert int(r.stdout.split()[1]) >= 8  # the least recent quarter was written behind
    with open_store(path, disk_blocks=64, host_blocks=32) as m:
        s = m.stats()
        assert s["recovered_blocks"] > 0 and s["corrupt_blocks"] == 0
        found = [h for h in range(200) if h in m]
        assert found
        for h in found:
            assert np.array_equal(get_one(m, h), data_for(h)), h
        assert m.stats()["corrupt_blocks"] == 0


# --- store files planted by another user --------------------------------


@needs_root
def test_store_files_of_another_user_or_open_to_others_are_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp: world-writable with the sticky bit
    path = shared / "kv.bin"
    index = Path(str(path) + ".index")
    with open_store(path) as m:  # the files as another user would plant them
        m.put([42], np.frombuffer(b"EVIL" * 1024, np.uint8))
    for f in (path, index):
        os.chown(f, 2002, 2002)
        os.chmod(f, 0o666)
    before = (path.read_bytes(), index.read_bytes())
    with pytest.raises(ValueError, match="owned by uid 2002, not by this process"):
        open_store(path)
    # Ours, but readable and writable by others: refused as well.
    os.chown(path, os.geteuid(), os.getegid())
    with pytest.raises(ValueError, match="store data file .* has permissions 0666"):
        open_store(path)
    os.chmod(path, 0o600)
    with pytest.raises(ValueError, match="store index .* owned by uid 2002"):
        open_store(path)
    os.chown(index, os.geteuid(), os.getegid())
    with pytest.raises(ValueError, match="store index .* has permissions 0666"):
        open_store(path)
    assert (path.read_bytes(), index.read_bytes()) == before  # nothing was written
    os.chmod(index, 0o600)
    with open_store(path) as m:  # private and ours: it opens
        assert 42 in m


# --- a failed index write must not leave memory and index apart --------


@needs_root
def test_clear_and_remove_on_a_full_filesystem_change_nothing(tiny_tmpfs: Path) -> None:
    path = tiny_tmpfs / "kv.bin"
    index = Path(str(path) + ".index")
    m = open_store(path, disk_blocks=64)
    m.put(list(range(11)), blocks(range(11)))
    # Grow the index to exactly one page, so the next record needs a new page (the header,
    # the open marker and 11 PUTs are 448 bytes: pairs of records fill the rest).
    while index.stat().st_size < 4096:
        m.put([500], data_for(500))
        m.remove([500])
    assert index.stat().st_size == 4096 and len(m) == 11
    filler = fill_up(tiny_tmpfs)
    with pytest.raises(OSError) as e:
        m.remove([3])
    assert e.value.errno == errno.ENOSPC
    assert 3 in m and np.array_equal(get_one(m, 3), data_for(3))  # nothing changed
    with pytest.raises(OSError) as e:
        m.clear()
    assert e.value.errno == errno.ENOSPC
    assert len(m) == 11 and all(np.array_equal(get_one(m, h), data_for(h)) for h in range(11))
    m.close()
    filler.unlink()
    with open_store(path, disk_blocks=64) as m:  # the failed calls did not happen on disk either
        assert len(m) == 11
        assert m.remove([3]) == 1
    with open_store(path, disk_blocks=64) as m:
        assert 3 not in m and len(m) == 10
        m.clear()
    with open_store(path, disk_blocks=64) as m:
        assert len(m) == 0


def test_failed_del_record_then_crash_never_serves_another_blocks_bytes(tmp_path: Path, faultshim: Path) -> None:
    # The review's reproducer: the DEL record of remove() fails (EIO), the next put reuses the
    # slot and the process is killed before its PUT record. Checksums off, so nothing would catch
    # a hash mapped to another block's bytes.
    path = str(tmp_path / "kv.bin")
    r = run_py(f"""
        kv = open_store({path!r}, disk_blocks=8, checksums=False)
        kv.put([1], np.frombuffer(b"ONE!" * 1024, np.uint8))
        try:
            kv.remove([1])
            sys.exit("the DEL record did not fail")
        except OSError:
            pass
        assert 1 in kv
        kv.put([2], np.frombuffer(b"TWO!" * 1024, np.uint8))
        sys.exit("not killed")
    """, env=shim_env(faultshim, suffix="kv.bin.index", op="write", n=4, kill_at=5))  # header, open, PUT, DEL
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    with open_store(Path(path), disk_blocks=8, checksums=False) as m:
        got = get_one(m, 1)
        assert got is not None and bytes(got[:4]) == b"ONE!"


WORKLOAD = """
kv = open_store({path!r}, disk_blocks=4, checksums=False, durability={durability!r})
errors = 0
for i in range(14):
    try:
        kv.put([i], data_for(i))
    except OSError:
        errors += 1
    if i % 3 == 2:
        try:
            kv.remove([i - 1])
        except OSError:
            errors += 1
    if i == 8:
        try:
            kv.clear()
        except OSError:
            errors += 1
kv.close()
print("errors", errors)
"""


@pytest.mark.parametrize("later", [1, 3])
@pytest.mark.parametrize("op,n,short,durability", [
    *[("write", n, s, "process") for n in (2, 3, 4, 5, 7, 9, 11, 14) for s in (0, 1)],
    *[("sync", n, 0, "sync") for n in (2, 3, 5, 8)],
])
def test_crash_points_after_a_failed_index_write_serve_no_wrong_bytes(
        tmp_path: Path, faultshim: Path, op: str, n: int, short: int, durability: str, later: int) -> None:
    # A failed (or torn) index write or fsync at call n, then a kill `later` index calls after it
    # (or a clean exit when the workload ends first). Every block served afterwards must hold its
    # own bytes: checksums are off, so a wrong index would show as wrong bytes.
    path = str(tmp_path / "kv.bin")
    env = shim_env(faultshim, suffix="kv.bin.index", op=op, n=n, short=short, kill_at=n + later)
    r = run_py(WORKLOAD.format(path=path, durability=durability), env=env)
    # Killed, or a call failed: either way the fault was injected.
    assert r.returncode == -signal.SIGKILL or (r.returncode == 0 and "errors 0" not in r.stdout), \
        r.stdout + r.stderr
    with open_store(Path(path), disk_blocks=4, checksums=False, durability=durability) as m:
        for h in range(14):
            got = get_one(m, h)
            assert got is None or np.array_equal(got, data_for(h)), f"block {h} served other bytes"
        assert len(m) <= 4


# --- the index log ---------------------------------------------------------


def test_a_torn_index_append_loses_no_later_put(tmp_path: Path) -> None:
    path = str(tmp_path / "kv.bin")
    r = run_py(f"""
        import resource
        kv = open_store({path!r}, disk_blocks=2048)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 + 32 * 2000 + 16, hard))  # mid-record
        failed = None
        for i in range(5000):
            try:
                kv.put([i % 5], data_for(i % 5))
                kv.remove([i % 5])
            except OSError as e:
                failed = e
                break
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert failed is not None and failed.errno == 27, failed  # EFBIG
        kv.put(list(range(100, 110)), np.concatenate([data_for(h) for h in range(100, 110)]))
        kv.close()
    """)
    assert r.returncode == 0, r.stdout + r.stderr
    with open_store(Path(path), disk_blocks=2048) as m:
        s = m.stats()
        assert s["index_torn_bytes"] == 0 and s["index_bad_records"] == 0
        for h in range(100, 110):
            assert np.array_equal(get_one(m, h), data_for(h))


def test_one_bad_record_costs_one_block_not_the_rest(tmp_path: Path, caplog) -> None:
    path = tmp_path / "kv.bin"
    index = Path(str(path) + ".index")
    with open_store(path, disk_blocks=128) as m:
        for h in range(100):
            m.put([h], data_for(h))
    size = index.stat().st_size
    assert size == 64 + (1 + 100 + 1) * 32  # the open marker, 100 PUTs, the close marker
    raw = bytearray(index.read_bytes())
    raw[64 + 3 * 32 + 10] ^= 0x01  # one bit of record 3 (block 2's PUT)
    index.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="dynblock"):
        with open_store(path, disk_blocks=128) as m:
            s = m.stats()
            assert s["recovered_blocks"] == 99 and s["index_bad_records"] == 1
            assert s["index_torn_bytes"] == 0
            assert 2 not in m
            for h in set(range(100)) - {2}:
                assert np.array_equal(get_one(m, h), data_for(h))
    assert any("damaged records" in r.getMessage() for r in caplog.records)
    with open_store(path, disk_blocks=128) as m:  # rewritten without the bad record
        assert m.stats()["index_bad_records"] == 0 and len(m) == 99


# --- index and data file bound together -----------------------------------------


def test_an_index_whose_data_file_is_gone_is_not_replayed(tmp_path: Path, caplog) -> None:
    path = tmp_path / "kv.bin"
    with open_store(path) as m:
        m.put(list(range(5)), blocks(range(5)))
    path.unlink()  # the data file is lost; the index stays
    with caplog.at_level(logging.WARNING, logger="dynblock"):
        with open_store(path) as m:
            assert len(m) == 0 and m.match(list(range(5))) == 0
            assert m.stats()["corrupt_blocks"] == 0
    assert any("no longer exists" in r.getMessage() for r in caplog.records)


def test_an_unrelated_file_is_never_adopted_or_overwritten(tmp_path: Path) -> None:
    precious = tmp_path / "precious.db"
    content = os.urandom(64 * BS)
    precious.write_bytes(content)
    os.chmod(precious, 0o600)
    with pytest.raises(ValueError, match="not a dynblock data file"):
        open_store(precious, disk_blocks=64)
    assert precious.read_bytes() == content
    assert not Path(str(precious) + ".index").exists()


def test_another_stores_index_is_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    with open_store(a) as m:
        m.put([1], data_for(1))
    open_store(b).close()
    shutil.copy2(str(a) + ".index", str(b) + ".index")
    with pytest.raises(ValueError, match="belongs to another data file"):
        open_store(b)


# --- an unreadable block ----------------------------------------------------


def test_an_unreadable_block_is_dropped_and_the_readable_prefix_returned(
        tmp_path: Path, faultshim: Path) -> None:
    path = str(tmp_path / "kv.bin")
    with open_store(Path(path)) as m:
        m.put(list(range(8)), blocks(range(8)))
        lo = m.disk.data_offset + 3 * m.disk.slot_stride
    r = run_py(f"""
        import logging
        logging.basicConfig(level=logging.WARNING)
        kv = open_store({path!r})
        out = np.zeros(8 * BS, np.uint8)
        assert kv.get(list(range(8)), out) == 3
        assert np.array_equal(out[:3 * BS], np.concatenate([data_for(h) for h in range(3)]))
        s = kv.stats()
        assert s["io_errors"] == 1 and s["corrupt_blocks"] == 0, s
        assert 3 not in kv and kv.match(list(range(8))) == 3
        assert kv.get(list(range(4, 8)), out[:4 * BS]) == 4  # the rest is still served
        assert np.array_equal(out[:4 * BS], np.concatenate([data_for(h) for h in range(4, 8)]))
        kv.put([3], data_for(3))  # a new copy goes to another slot... or the same one, rewritten
        print("ok")
    """, env=shim_env(faultshim, suffix="kv.bin", op="read", count=-1, off_lo=lo, off_hi=lo + BS))
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
    assert r.stderr.count("could not be read") == 1  # logged once


# --- leaks ------------------------------------------------------------------------


def test_a_failed_open_leaves_no_data_file_behind(tmp_path: Path) -> None:
    path = tmp_path / "kv.bin"
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep")
    os.symlink(target, str(path) + ".index")
    with pytest.raises(ValueError, match="symbolic link"):
        open_store(path, disk_blocks=256)
    assert not path.exists()
    assert target.read_bytes() == b"keep"


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _fds_to(path: Path) -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                n += 1
        except OSError:
            pass
    return n


def test_close_releases_files_and_threads_at_once(tmp_path: Path) -> None:
    path = tmp_path / "kv.bin"
    index = Path(str(path) + ".index")
    gc.collect()
    before = _threads()
    managers = [open_store(tmp_path / f"kv{i}.bin") for i in range(3)]
    m = open_store(path, host_blocks=4)
    m.put([1, 2], blocks([1, 2]))
    assert _fds_to(index) == 1 and _threads() > before
    for x in managers + [m]:
        x.close()  # still referenced: nothing waits for garbage collection
    assert _fds_to(index) == 0 and _fds_to(path) == 0
    deadline = time.monotonic() + 5
    while _threads() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _threads() == before


def test_leftovers_of_a_crashed_compaction_are_removed_at_open(tmp_path: Path) -> None:
    path = tmp_path / "kv.bin"
    with open_store(path) as m:
        m.put([1], data_for(1))
    stale = tmp_path / "kv.bin.index.compact-4b1d0c"
    stale.write_bytes(b"half a compaction")
    with open_store(path) as m:
        assert 1 in m
    assert not stale.exists()


# --- reopen errors and layouts ------------------------------------------------------


def test_a_resized_data_file_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "kv.bin"
    open_store(path, disk_blocks=8).close()
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - BS)
    with pytest.raises(ValueError, match="truncated or extended"):
        open_store(path, disk_blocks=8)


def test_a_store_moved_to_a_filesystem_with_another_alignment_opens(
        tmp_path: Path, loop_ext4_4k: Path) -> None:
    src = tmp_path / "kv.bin"
    with open_store(src, block_size=5000) as m:
        if m.disk.alignment >= 4096:
            pytest.skip(f"{tmp_path} already has {m.disk.alignment}-byte alignment: nothing to move across")
        want = np.random.default_rng(7).integers(0, 256, 10000, dtype=np.uint8)
        m.put([1, 2], want)
    dst = loop_ext4_4k / "kv.bin"
    shutil.copy2(src, dst)
    shutil.copy2(str(src) + ".index", str(dst) + ".index")
    with open_store(dst, block_size=5000) as m:
        d = m.stats()["disk"]
        assert d["o_direct"] is False and "laid out for another filesystem" in d["fallback_reason"]
        out = np.zeros(10000, np.uint8)
        assert m.get([1, 2], out) == 2 and np.array_equal(out, want)
    with pytest.raises(dynblock.ODirectError, match="laid out for another filesystem"):
        open_store(dst, block_size=5000, o_direct="require")


@pytest.mark.parametrize("made,reopened", [("bf16", "bfloat16"), ("bfloat16", "torch.bfloat16"),
                                           (np.float16, "float16"), ("fp16", "half"),
                                           ("fp8", "float8_e4m3fn")])
def test_dtype_aliases_are_one_layout(tmp_path: Path, made, reopened) -> None:
    path = str(tmp_path / "kv.bin")

    def lay(dt):
        return KvLayout(2, 2, 16, 32, dtype=dt)

    BlockManager.open(path, layout=lay(made), disk_blocks=4, numa_node=None, pin=False).close()
    BlockManager.open(path, layout=lay(reopened), disk_blocks=4, numa_node=None, pin=False).close()
    with pytest.raises(ValueError, match="layout fingerprint"):  # same bytes, another layout
        BlockManager.open(path, layout=KvLayout(1, 2, 16, 64, dtype=made), disk_blocks=4,
                          numa_node=None, pin=False)
