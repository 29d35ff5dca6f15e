"""Reproducers of the turn-2 review (defects D1-D18 of the hardening issue),
each turned into a test on real parts: real files on real filesystems, real
subprocesses, real fork(), real resource limits, and an LD_PRELOAD shim
(tests/faults/faultshim.c) where a device must fail on cue."""

from __future__ import annotations

import errno
import gc
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pytest

import dynblock
from dynblock import BlockManager, Config, DiskStorage, HostStorage, KvLayout, doctor

from conftest import fill_up
from test_topology import env_with, fake_nvidia_smi, load

BS = 4096

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mounts)")


def data_for(h: int, bs: int = BS) -> np.ndarray:
    return np.random.default_rng(h).integers(0, 256, size=bs, dtype=np.uint8)


def blocks(hs, bs: int = BS) -> np.ndarray:
    return np.concatenate([data_for(h, bs) for h in hs])


def open_store(path: Path, disk_blocks: int = 16, **kw) -> BlockManager:
    kw.setdefault("block_size", BS)
    return BlockManager.open(str(path), disk_blocks=disk_blocks, numa_node=None, pin=False, **kw)


def get_one(m: BlockManager, h: int) -> Optional[np.ndarray]:
    out = np.zeros(BS, np.uint8)
    return out if m.get([h], out) == 1 else None


PRELUDE = f"""
import os, sys
import numpy as np
import dynblock
BS = {BS}
def data_for(h):
    return np.random.default_rng(h).integers(0, 256, size=BS, dtype=np.uint8)
def open_store(path, **kw):
    kw.setdefault("disk_blocks", 16)
    return dynblock.BlockManager.open(path, block_size=BS, numa_node=None, pin=False, **kw)
"""


def run_py(code: str, env: Optional[Dict[str, str]] = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def shim_env(shim: Path, **faults: object) -> Dict[str, str]:
    env = {"LD_PRELOAD": str(shim)}
    env.update({f"FAULT_{k.upper()}": str(v) for k, v in faults.items()})
    return env


# --- D1: store files planted by another user --------------------------------


@needs_root
def test_d1_store_files_of_another_user_or_open_to_others_are_refused(tmp_path: Path) -> None:
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


# --- D2: a failed index write must not leave memory and index apart --------


@needs_root
def test_d2_clear_and_remove_on_a_full_filesystem_change_nothing(tiny_tmpfs: Path) -> None:
    path = tiny_tmpfs / "kv.bin"
    index = Path(str(path) + ".index")
    m = open_store(path, disk_blocks=64)
    m.put(list(range(10)), blocks(range(10)))
    # Grow the index to exactly one page, so the next record needs a new page.
    while index.stat().st_size < 4096:
        m.put([500], data_for(500))
        m.remove([500])
    assert index.stat().st_size == 4096 and len(m) == 10
    filler = fill_up(tiny_tmpfs)
    with pytest.raises(OSError) as e:
        m.remove([3])
    assert e.value.errno == errno.ENOSPC
    assert 3 in m and np.array_equal(get_one(m, 3), data_for(3))  # nothing changed
    with pytest.raises(OSError) as e:
        m.clear()
    assert e.value.errno == errno.ENOSPC
    assert len(m) == 10 and all(np.array_equal(get_one(m, h), data_for(h)) for h in range(10))
    m.close()
    filler.unlink()
    with open_store(path, disk_blocks=64) as m:  # the failed calls did not happen on disk either
        assert len(m) == 10
        assert m.remove([3]) == 1
    with open_store(path, disk_blocks=64) as m:
        assert 3 not in m and len(m) == 9
        m.clear()
    with open_store(path, disk_blocks=64) as m:
        assert len(m) == 0


def test_d2_failed_del_record_then_crash_never_serves_another_blocks_bytes(tmp_path: Path, faultshim: Path) -> None:
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
    """, env=shim_env(faultshim, suffix="kv.bin.index", op="write", n=3, kill_at=4))
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
def test_d2_crash_points_after_a_failed_index_write_serve_no_wrong_bytes(
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


# --- D3: fork -------------------------------------------------------------------


def test_d3_a_forked_child_gets_a_clear_error_and_the_parent_is_unharmed(tmp_path: Path) -> None:
    r = run_py(f"""
        import multiprocessing
        cfg = dynblock.Config(block_size=1 << 20, host_blocks=8, disk_blocks=32, disk_dir={str(tmp_path)!r},
                              numa_node=None, pin=False)
        kv = dynblock.BlockManager(cfg)
        src = np.arange(4 << 20, dtype=np.uint64).astype(np.uint8)
        kv.put(list(range(4)), src)
        pid = os.fork()
        if pid == 0:
            try:
                kv.get(list(range(4)), np.empty(4 << 20, np.uint8))
                os._exit(3)
            except dynblock.ForkError as e:
                os._exit(0 if "spawn" in str(e) and "after forking" in str(e) else 4)
            except BaseException:
                os._exit(5)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, os.waitstatus_to_exitcode(status)

        def use_store(_):
            try:
                kv.put([99], np.zeros(1 << 20, np.uint8))
                return "stored"
            except dynblock.ForkError:
                return "ForkError"
        with multiprocessing.get_context("fork").Pool(1) as pool:
            assert pool.map(use_store, [0]) == ["ForkError"]
        out = np.zeros(4 << 20, np.uint8)
        assert kv.get(list(range(4)), out) == 4 and np.array_equal(out, src)
        assert 99 not in kv
        print("ok")
    """, timeout=60)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_d3_a_forked_child_cannot_touch_a_persistent_store(tmp_path: Path) -> None:
    path = str(tmp_path / "kv.bin")
    # The parent keeps its lock while the child exits: run it as a background process.
    code = PRELUDE + textwrap.dedent(f"""
        kv = open_store({path!r})
        kv.put([1, 2], np.concatenate([data_for(1), data_for(2)]))
        pid = os.fork()
        if pid == 0:
            codes = 0
            for call in (lambda: kv.put([50], data_for(50)), lambda: kv.sync(), lambda: len(kv)):
                try:
                    call()
                except dynblock.ForkError:
                    codes += 1
            kv.close()
            os._exit(0 if codes == 3 else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        kv.put([3], data_for(3))
        print("ok", flush=True)
        sys.stdin.read()
        kv.close()
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        ready, _, _ = select.select([p.stdout], [], [], 60)  # a hung child must not hang the test
        assert ready, "the parent did not report within 60 s (a fork deadlock?)"
        assert p.stdout.readline().strip() == "ok"
        with pytest.raises(dynblock.StoreLockedError, match="another process"):
            open_store(Path(path))  # the child's exit left the parent's lock in place
        out, err = p.communicate("", timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)
    assert p.returncode == 0, err
    with open_store(Path(path)) as m:
        assert sorted(h for h in (1, 2, 3, 50) if h in m) == [1, 2, 3]
        assert all(np.array_equal(get_one(m, h), data_for(h)) for h in (1, 2, 3))


# --- D4/D5: the index log ---------------------------------------------------------


def test_d4_a_torn_index_append_loses_no_later_put(tmp_path: Path) -> None:
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


def test_d5_one_bad_record_costs_one_block_not_the_rest(tmp_path: Path, caplog) -> None:
    path = tmp_path / "kv.bin"
    index = Path(str(path) + ".index")
    with open_store(path, disk_blocks=128) as m:
        for h in range(100):
            m.put([h], data_for(h))
    size = index.stat().st_size
    assert size == 64 + 100 * 32
    raw = bytearray(index.read_bytes())
    raw[64 + 2 * 32 + 10] ^= 0x01  # one bit of record 2 (block 2)
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


# --- D6: index and data file bound together -----------------------------------------


def test_d6_an_index_whose_data_file_is_gone_is_not_replayed(tmp_path: Path, caplog) -> None:
    path = tmp_path / "kv.bin"
    with open_store(path) as m:
        m.put(list(range(5)), blocks(range(5)))
    path.unlink()  # the data file is lost; the index stays
    with caplog.at_level(logging.WARNING, logger="dynblock"):
        with open_store(path) as m:
            assert len(m) == 0 and m.match(list(range(5))) == 0
            assert m.stats()["corrupt_blocks"] == 0
    assert any("no longer exists" in r.getMessage() for r in caplog.records)


def test_d6_an_unrelated_file_is_never_adopted_or_overwritten(tmp_path: Path) -> None:
    precious = tmp_path / "precious.db"
    content = os.urandom(64 * BS)
    precious.write_bytes(content)
    os.chmod(precious, 0o600)
    with pytest.raises(ValueError, match="not a dynblock data file"):
        open_store(precious, disk_blocks=64)
    assert precious.read_bytes() == content
    assert not Path(str(precious) + ".index").exists()


def test_d6_another_stores_index_is_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    with open_store(a) as m:
        m.put([1], data_for(1))
    open_store(b).close()
    shutil.copy2(str(a) + ".index", str(b) + ".index")
    with pytest.raises(ValueError, match="belongs to another data file"):
        open_store(b)


# --- D8: destinations that do not expose their memory ----------------------------------


def test_d8_a_destination_with_only_array_is_refused(tmp_path: Path) -> None:
    class CopyingDst:
        def __init__(self) -> None:
            self.a = np.zeros(BS, np.uint8)

        def __array__(self, dtype=None, copy=None):
            return self.a.copy()

    class SharingDst:  # exposes its memory through the array interface: fine
        def __init__(self) -> None:
            self.a = np.zeros(BS, np.uint8)
            self.__array_interface__ = self.a.__array_interface__

    with BlockManager(Config(block_size=BS, host_blocks=4, numa_node=None, pin=False)) as kv:
        kv.put([1], np.full(BS, 9, np.uint8))
        d = CopyingDst()
        with pytest.raises(TypeError, match="does not expose its memory"):
            kv.get([1], d)
        assert not d.a.any()
        s = SharingDst()
        assert kv.get([1], s) == 1 and (s.a == 9).all()


# --- D10: malformed sysfs lists ----------------------------------------------------


def test_d10_a_huge_range_in_a_sysfs_list_is_an_error_not_an_abort(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    (sysfs / "devices/system/node/node0").mkdir(parents=True)
    (sysfs / "devices/system/node/online").write_text("0-4000000000\n")
    r = run_py(f"""
        try:
            dynblock.HostStorage(1, 4096, numa_node=0, pin=False, sysfs_root={str(sysfs)!r})
        except dynblock.NumaError as e:
            print("NumaError:", e)
    """)
    assert r.returncode == 0 and "above the largest possible" in r.stdout, r.stdout + r.stderr
    d = subprocess.run([sys.executable, "-m", "dynblock.doctor", "--json", "--sysfs-root", str(sysfs),
                        "--dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert d.returncode in (0, 1), d.stderr
    import json

    assert "checks" in json.loads(d.stdout)


# --- D12: an unreadable block ----------------------------------------------------


def test_d12_an_unreadable_block_is_dropped_and_the_readable_prefix_returned(
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


# --- D14: leaks ------------------------------------------------------------------------


def test_d14_a_failed_open_leaves_no_data_file_behind(tmp_path: Path) -> None:
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


def test_d14_close_releases_files_and_threads_at_once(tmp_path: Path) -> None:
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


def test_d14_leftovers_of_a_crashed_compaction_are_removed_at_open(tmp_path: Path) -> None:
    path = tmp_path / "kv.bin"
    with open_store(path) as m:
        m.put([1], data_for(1))
    stale = tmp_path / "kv.bin.index.compact-4b1d0c"
    stale.write_bytes(b"half a compaction")
    with open_store(path) as m:
        assert 1 in m
    assert not stale.exists()


# --- D15: reopen errors and layouts ------------------------------------------------------


def test_d15_a_resized_data_file_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "kv.bin"
    open_store(path, disk_blocks=8).close()
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - BS)
    with pytest.raises(ValueError, match="truncated or extended"):
        open_store(path, disk_blocks=8)


def test_d15_a_store_moved_to_a_filesystem_with_another_alignment_opens(
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
def test_d15_dtype_aliases_are_one_layout(tmp_path: Path, made, reopened) -> None:
    path = str(tmp_path / "kv.bin")

    def lay(dt):
        return KvLayout(2, 2, 16, 32, dtype=dt)

    BlockManager.open(path, layout=lay(made), disk_blocks=4, numa_node=None, pin=False).close()
    BlockManager.open(path, layout=lay(reopened), disk_blocks=4, numa_node=None, pin=False).close()
    with pytest.raises(ValueError, match="layout fingerprint"):  # same bytes, another layout
        BlockManager.open(path, layout=KvLayout(1, 2, 16, 64, dtype=made), disk_blocks=4,
                          numa_node=None, pin=False)


# --- D16: topology input ------------------------------------------------------------------

QUERY_ONE = "0, GPU-11111111-2222-3333-4444-555555555555, 00000000:18:00.0\n"


@pytest.mark.parametrize("query,topo,why", [
    (b"0, GPU-1111\xff\xfe, 00000000:18:00.0\n", None, None),  # non-UTF-8 bytes
    (b"No devices were found\n", None, "does not know"),
    (b"", None, "lists no GPUs"),
    (None, b"\tGPU0\tCPU Affinity\tNUMA Affinity\nGPU0\t X \t0-4000000000\t0\n", "does not know"),
    (None, b"\tGPU0\tCPU Affinity\tNUMA Affinity\nGPU0\t X \t0-3\t99999999999999999999999\n",
     "does not know"),
])
def test_d16_odd_nvidia_smi_output_means_no_binding_with_a_reason(tmp_path: Path, query, topo, why) -> None:
    exe = fake_nvidia_smi(tmp_path, load("single_gpu_na.txt"), QUERY_ONE)
    if query is not None:
        (tmp_path / "query.txt").write_bytes(query)
    if topo is not None:
        (tmp_path / "topo.txt").write_bytes(topo)
    r = dynblock.topology.resolve_gpu(0, sysfs_root=str(tmp_path / "nosys"), env=env_with(exe.parent))
    assert r.numa_node is None
    if why:
        assert why in r.reason, r.reason
    # and through the host tier: no binding, no exception from deep inside
    h = HostStorage(1, 4096, gpu=0, pin=False, nvidia_smi=str(exe), sysfs_root=str(tmp_path / "nosys"))
    assert h.numa_node is None
    h.close()


@pytest.mark.parametrize("cvd", ["\u00b2", "\uff10", "GPU-", "0,0", "00,0", "GPU-1111,GPU-1111"])
def test_d16_cuda_visible_devices_that_cuda_refuses_name_the_variable(tmp_path: Path, cvd: str) -> None:
    exe = fake_nvidia_smi(tmp_path, load("single_gpu_na.txt"), QUERY_ONE)
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        dynblock.topology.resolve_gpu(0, env=env_with(exe.parent, CUDA_VISIBLE_DEVICES=cvd))


# --- D17: configuration and environment --------------------------------------------------


def test_d17_a_tier_smaller_than_one_block_is_an_error(clean_env) -> None:
    with pytest.raises(ValueError, match="host_bytes=1000 is less than one block"):
        Config(host_bytes=1000, block_size=1 << 20)
    with pytest.raises(ValueError, match="disk_bytes=4095 is less than one block"):
        Config(disk_bytes=4095, block_size=4096, host_blocks=1)
    with pytest.raises(ValueError, match="less than one block"):
        Config.from_env({"DYNBLOCK_BLOCK_SIZE": str(2 << 20), "DYN_KVBM_CPU_CACHE_GB": "0.001"})
    assert Config(host_bytes=0, disk_blocks=1, block_size=4096).host_blocks == 0  # 0 means none


def test_d17_env_precedence_is_the_documented_one(clean_env) -> None:
    env = {"DYNBLOCK_BLOCK_SIZE": "4096", "DYNBLOCK_HOST_BYTES": "40960",
           "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "3", "DYN_KVBM_CPU_CACHE_GB": "1"}
    assert Config.from_env(env).host_blocks == 10  # ours (bytes) beats Dynamo's override
    env.pop("DYNBLOCK_HOST_BYTES")
    assert Config.from_env(env).host_blocks == 3  # Dynamo's override beats Dynamo's GB
    env["DYNBLOCK_HOST_BLOCKS"] = "7"
    assert Config.from_env(env).host_blocks == 7
    assert "DYNBLOCK_<TIER>_BYTES" in dynblock.config.__doc__


@pytest.mark.parametrize("value", ["1_000", "\u0663", "+5", "0x10", " 1 2"])
def test_d17_integers_are_plain_ascii_decimal(clean_env, value: str) -> None:
    with pytest.raises(dynblock.EnvError, match="DYNBLOCK_HOST_BLOCKS"):
        Config.from_env({"DYNBLOCK_BLOCK_SIZE": "4096", "DYNBLOCK_HOST_BLOCKS": value})


@pytest.mark.parametrize("env,field", [
    ({"DYNBLOCK_BLOCK_SIZE": str(2**64), "DYNBLOCK_HOST_BLOCKS": "1"}, "block_size"),
    ({"DYNBLOCK_BLOCK_SIZE": "4096", "DYN_KVBM_DISK_CACHE_GB": "1e30"}, "disk_bytes"),
    ({"DYNBLOCK_BLOCK_SIZE": "4096", "DYNBLOCK_HOST_BLOCKS": "1", "DYNBLOCK_IO_DEPTH": "5000"}, "io_depth"),
])
def test_d17_absurd_values_fail_naming_the_variable_and_the_field(clean_env, env,
                                                                  field: str) -> None:
    var = next(k for k in env if k not in ("DYNBLOCK_BLOCK_SIZE", "DYNBLOCK_HOST_BLOCKS")
               or field == "block_size" and k == "DYNBLOCK_BLOCK_SIZE")
    with pytest.raises(dynblock.EnvError, match=f"^environment variable {var}=.*: {field}"):
        Config.from_env(env)


def test_d17_numpy_integers_and_stripped_paths(clean_env, tmp_path: Path) -> None:
    c = Config(block_size=np.int64(4096), host_blocks=np.uint32(2))
    assert c.block_size == 4096 and type(c.block_size) is int and c.host_blocks == 2
    c = Config.from_env({"DYNBLOCK_BLOCK_SIZE": "4096", "DYNBLOCK_DISK_BLOCKS": "2",
                         "DYNBLOCK_DISK_DIR": f" {tmp_path} "})
    assert c.disk_dir == str(tmp_path)
    with pytest.raises(ValueError, match="disk_dir=.* and disk_path=.* disagree"):
        Config.from_env({"DYNBLOCK_BLOCK_SIZE": "4096", "DYNBLOCK_DISK_BLOCKS": "2",
                         "DYNBLOCK_DISK_DIR": "/var/tmp", "DYNBLOCK_PERSIST": "1",
                         "DYNBLOCK_DISK_PATH": str(tmp_path / "kv.bin")})


def test_d17_explicit_numa_none_does_not_read_the_environment(clean_env) -> None:
    clean_env.setenv("DYN_MEMORY_DISABLE_NUMA", "")  # malformed, but binding was not asked for
    with BlockManager(Config(block_size=4096, host_blocks=2, numa_node=None, pin=False)) as kv:
        assert kv.host is not None and kv.host.numa_node is None
    with pytest.raises(dynblock.EnvError, match="DYN_MEMORY_DISABLE_NUMA"):
        HostStorage(1, 4096, numa_node=0, pin=False)


def test_one_message_per_setting_wherever_it_is_given(clean_env, tmp_path: Path) -> None:
    msgs = set()
    for make in (lambda: Config(block_size=4096, disk_blocks=1, io_depth=0),
                 lambda: DiskStorage(tmp_path, 1, 4096, io_depth=0),
                 lambda: dynblock._core.check_setting("io_depth", 0)):
        with pytest.raises(ValueError) as e:
            make()
        msgs.add(str(e.value))
    assert len(msgs) == 1 and "io_depth" in msgs.pop()
    defaults = dynblock._core.settings_defaults()
    assert Config(block_size=1, host_blocks=1).io_depth == defaults["io_depth"]
    import inspect

    assert inspect.signature(DiskStorage).parameters["io_depth"].default == defaults["io_depth"]


# --- D18: doctor, closed managers, odd inputs ---------------------------------------------


@pytest.mark.parametrize("arg", ["--host-gib", "--shm-gib", "--disk-gib"])
@pytest.mark.parametrize("value", ["inf", "1e400", "nan"])
def test_d18_doctor_refuses_non_finite_sizes_with_a_usage_error(arg: str, value: str) -> None:
    r = subprocess.run([sys.executable, "-m", "dynblock.doctor", arg, value], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "finite" in r.stderr and "Traceback" not in r.stderr


def test_d18_doctor_advice_fits_what_is_at_the_path(tmp_path: Path) -> None:
    f = tmp_path / "afile"
    f.write_text("x")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    for p, words in ((f, "is a file"), (fifo, "is a FIFO"), (loop, "symbolic link"),
                     (tmp_path / "missing", "mkdir -p")):
        (c,) = [c for c in doctor.check_cache_dir(str(p), 1 << 20) if c.name == "cache_dir"]
        assert c.status == "fail" and words in c.fix, (p, c.fix)
        if words != "mkdir -p":
            assert "mkdir" not in c.fix


def test_d18_a_closed_manager_answers_nothing(tmp_path: Path) -> None:
    kv = BlockManager(Config(block_size=BS, host_blocks=2, numa_node=None, pin=False))
    kv.put([1], data_for(1))
    kv.close()
    for call in (lambda: len(kv), lambda: 1 in kv, kv.stats, kv.lru_order, lambda: kv.match([1]),
                 lambda: kv.get([1], np.zeros(BS, np.uint8))):
        with pytest.raises(ValueError, match="BlockManager is closed"):
            call()
    assert "closed" in repr(kv)


@pytest.mark.parametrize("hashes", [bytearray(b"\x01\x02"), {1, 2}, {1: 2}, frozenset([1])])
def test_d18_unordered_or_byte_hash_lists_are_refused(hashes) -> None:
    with BlockManager(Config(block_size=BS, host_blocks=2, numa_node=None, pin=False)) as kv:
        with pytest.raises(TypeError, match="hashes"):
            kv.put(hashes, np.zeros(2 * BS, np.uint8))


def test_d18_ctypes_arrays_are_buffers_too() -> None:
    import ctypes

    with BlockManager(Config(block_size=BS, host_blocks=2, numa_node=None, pin=False)) as kv:
        src = (ctypes.c_uint8 * BS)(*([7] * BS))
        assert kv.put([1], src) == 1
        dst = (ctypes.c_uint8 * BS)()
        assert kv.get([1], dst) == 1 and bytes(dst) == bytes(src)


def test_d18_a_huge_hash_range_is_refused_before_it_is_listed() -> None:
    with BlockManager(Config(block_size=BS, host_blocks=2, numa_node=None, pin=False)) as kv:
        # Listing 2**40 hashes would take TiBs of memory: the size check comes first.
        with pytest.raises(ValueError, match="need exactly"):
            kv.get(range(2**40), np.zeros(BS, np.uint8))


def test_d18_host_alignment_above_a_huge_page_is_honoured() -> None:
    h = HostStorage(4, 4 << 20, numa_node=None, pin=False, alignment=16 << 20)
    try:
        assert h._h.data_ptr % (16 << 20) == 0
        assert h.slot_stride % (16 << 20) == 0
    finally:
        h.close()
