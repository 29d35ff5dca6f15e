"""Durability: checksums, the persistent store across restarts and kill -9,
and real faults (flipped bytes, torn index, ENOSPC)."""

from __future__ import annotations

import errno
import logging
import os
import random
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

from dynblock import BlockManager, KvLayout, StoreLockedError
from conftest import fill_up

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
    os.truncate(index, size - 5)  # the last record torn
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
