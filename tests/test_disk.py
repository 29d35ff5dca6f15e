"""The disk tier on real filesystems."""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dynblock
from dynblock import CapacityError, DiskStorage, EnvError, ODirectError
from conftest import fill_up

BS = 8192


def rand_blocks(n: int, bs: int = BS, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=n * bs, dtype=np.uint8)


def entries(d: Path) -> list:
    return sorted(os.listdir(d))


# --- round trips ------------------------------------------------------------


@pytest.mark.parametrize("block_size", [4096, 5000, 65536, 2 << 20])
def test_round_trip_o_direct_on_local_disk(tmp_path: Path, clean_env, block_size: int) -> None:
    if dynblock._core.fs_type(str(tmp_path)) not in ("ext4", "xfs", "btrfs"):
        pytest.skip(f"{tmp_path} is on {dynblock._core.fs_type(str(tmp_path))}, not a local disk fs")
    with DiskStorage(tmp_path, 8, block_size) as s:
        assert s.o_direct is True and s.fallback_reason is None
        assert s.slot_stride % s.alignment == 0
        assert s.slot_stride - block_size < s.alignment
        assert s.file_size == 8 * s.slot_stride
        slots = [6, 7, 0, 3]
        src = rand_blocks(len(slots), block_size, seed=block_size)
        s.write_blocks(slots, src)
        dst = np.zeros_like(src)
        s.read_blocks(slots, dst)
        assert np.array_equal(src, dst)
        one = np.zeros(block_size, dtype=np.uint8)
        s.read_block(3, one)
        assert np.array_equal(one, src[3 * block_size :])


def test_alignment_comes_from_statx_on_ext4(tmp_path: Path, clean_env) -> None:
    if dynblock._core.fs_type(str(tmp_path)) != "ext4":
        pytest.skip("not on ext4")
    with DiskStorage(tmp_path, 2, 4096) as s:
        # Linux >= 6.1 answers STATX_DIOALIGN on ext4 (512/512 on this machine kind).
        m = re.match(r"(\d+)\.(\d+)", os.uname().release)
        if m and (int(m.group(1)), int(m.group(2))) >= (6, 1):
            assert s.alignment_source == "statx"
        assert s.alignment in (512, 1024, 2048, 4096)
        assert s.memory_alignment in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def test_unaligned_caller_buffers_never_see_einval(tmp_path: Path, clean_env) -> None:
    with DiskStorage(tmp_path, 8, 4096) as s:
        raw = rand_blocks(3, 4096, seed=3)
        backing = np.zeros(3 * 4096 + 1, dtype=np.uint8)
        src = backing[1:]  # address off by one byte: needs the bounce buffers
        src[:] = raw
        assert src.ctypes.data % 2 == 1
        s.write_blocks([1, 2, 5], src)
        out_backing = np.zeros(3 * 4096 + 3, dtype=np.uint8)
        dst = out_backing[3:]
        s.read_blocks([1, 2, 5], dst)
        assert np.array_equal(dst, raw)


def test_accepts_memoryview_bytearray_and_other_dtypes(tmp_path: Path, clean_env) -> None:
    with DiskStorage(tmp_path, 4, 4096) as s:
        src = np.arange(2 * 4096 // 2, dtype=np.float16)
        s.write_blocks(np.array([0, 1], dtype=np.uint64), src)
        out = bytearray(2 * 4096)
        s.read_blocks([0, 1], memoryview(out))
        assert bytes(out) == src.tobytes()
        out2 = np.empty(2 * 4096 // 4, dtype=np.int32)
        s.read_blocks(np.array([0, 1], dtype=np.int64), out2)
        assert out2.tobytes() == src.tobytes()


def _aligned_copy(a: np.ndarray) -> np.ndarray:
    out = dynblock.aligned_empty(a.nbytes)
    out[:] = a
    assert out.ctypes.data % 4096 == 0
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batches=st.lists(
        st.tuples(
            st.booleans(),
            st.lists(st.integers(0, 15), min_size=1, max_size=10),
            st.integers(0, 2**32 - 1),
        ),
        min_size=1,
        max_size=12,
    ),
    block_size=st.sampled_from([512, 3000, 4096, 12288]),
    o_direct=st.booleans(),
    aligned=st.booleans(),
    engine=st.sampled_from(["auto", "threads"]),
)
def test_random_batches_match_a_dict_model(tmp_path_factory, batches, block_size, o_direct, aligned,
                                           engine) -> None:
    # aligned buffers take the zero-copy (and, for adjacent slots, vectored)
    # path, through the io_uring ring where the kernel has one ("auto"); unaligned
    # ones the bounce buffers.
    d = tmp_path_factory.mktemp("hyp")
    model: dict = {}
    with DiskStorage(d, 16, block_size, o_direct=o_direct, io_depth=4, max_io_bytes=3 * 4096,
                     engine=engine) as s:
        for is_write, slots, seed in batches:
            if is_write:
                slots = list(dict.fromkeys(slots))  # no duplicates in a write batch
                src = rand_blocks(len(slots), block_size, seed)
                if aligned:
                    src = _aligned_copy(src)
                s.write_blocks(slots, src)
                for i, sl in enumerate(slots):
                    model[sl] = src[i * block_size : (i + 1) * block_size].copy()
            else:
                dst = np.zeros(len(slots) * block_size, dtype=np.uint8)
                if aligned:
                    dst = _aligned_copy(dst)
                s.read_blocks(slots, dst)
                for i, sl in enumerate(slots):
                    want = model.get(sl, np.zeros(block_size, dtype=np.uint8))
                    assert np.array_equal(dst[i * block_size : (i + 1) * block_size], want)
    assert entries(d) == []


# --- fallback on a filesystem that refuses O_DIRECT -------------------------


def test_ramfs_falls_back_to_buffered_and_keeps_data(ramfs_dir: Path, clean_env, caplog) -> None:
    assert dynblock._core.fs_type(str(ramfs_dir)) == "ramfs"
    with caplog.at_level(logging.WARNING, logger="dynblock"):
        s = DiskStorage(ramfs_dir, 8, 5000)
    assert s.o_direct is False
    assert s.engine == "threads"  # buffered I/O never goes to a ring
    assert "ramfs" in s.fallback_reason and "EINVAL" in s.fallback_reason
    warnings = [r for r in caplog.records if r.name == "dynblock.disk"]
    assert len(warnings) == 1 and "ramfs" in warnings[0].getMessage()
    src = rand_blocks(4, 5000, seed=9)
    s.write_blocks([7, 0, 1, 2], src)
    dst = np.zeros_like(src)
    s.read_blocks([7, 0, 1, 2], dst)
    assert np.array_equal(src, dst)
    s.close()
    assert entries(ramfs_dir) == []


def test_ramfs_require_raises_and_leaves_nothing(ramfs_dir: Path, clean_env) -> None:
    with pytest.raises(ODirectError, match="ramfs"):
        DiskStorage(ramfs_dir, 8, 4096, o_direct="require")
    with pytest.raises(ODirectError):
        DiskStorage(ramfs_dir / "named.bin", 8, 4096, o_direct="require", persist=True)
    assert entries(ramfs_dir) == []


@pytest.mark.parametrize("engine", ["threads", "io_uring"])
def test_einval_at_first_direct_io_falls_back(loop_ext4_4k: Path, clean_env, caplog, engine: str) -> None:
    # The device's sectors are 4096 bytes; forcing 512-byte alignment makes the
    # kernel accept O_DIRECT at open and refuse the first I/O with EINVAL. Aligned
    # memory and two runs of slots: under io_uring the ring issues both, both come
    # back EINVAL, and the synchronous path falls back and does them again.
    if engine == "io_uring":
        _need_io_uring(loop_ext4_4k)
    with caplog.at_level(logging.WARNING, logger="dynblock"):
        s = DiskStorage(loop_ext4_4k, 4, 512, alignment=(512, 512), engine=engine)
    assert s.engine == engine
    assert s.o_direct is False
    assert "EINVAL" in s.fallback_reason and "first direct" in s.fallback_reason
    src = _aligned_copy(rand_blocks(3, 512, seed=1))
    s.write_blocks([0, 1, 3], src)
    dst = _aligned_copy(np.zeros_like(src))
    s.read_blocks([0, 1, 3], dst)
    assert np.array_equal(src, dst)
    s.close()
    with pytest.raises(ODirectError, match="EINVAL"):
        DiskStorage(loop_ext4_4k, 4, 512, alignment=(512, 512), o_direct="require")
    # and with the alignment the kernel reports, O_DIRECT works there
    with DiskStorage(loop_ext4_4k, 4, 512) as good:
        assert good.o_direct is True and good.alignment == 4096
        good.write_blocks([2], src[:512])
    assert [e for e in entries(loop_ext4_4k) if e != "lost+found"] == []


# --- configuration toggle ---------------------------------------------------


@pytest.mark.parametrize(
    "var,value,direct",
    [
        ("DYNBLOCK_DISABLE_O_DIRECT", "1", False),
        ("DYNBLOCK_DISABLE_O_DIRECT", "ON", False),
        ("DYNBLOCK_DISABLE_O_DIRECT", "no", True),
        ("DYN_KVBM_DISK_DISABLE_O_DIRECT", "true", False),
        ("DYN_KVBM_DISK_DISABLE_O_DIRECT", "false", True),  # unlike Dynamo
        ("DYN_KVBM_DISK_DISABLE_O_DIRECT", " 0 ", True),
    ],
)
def test_environment_toggle(tmp_path: Path, clean_env, var: str, value: str, direct: bool) -> None:
    clean_env.setenv(var, value)
    with DiskStorage(tmp_path, 2, 4096) as s:
        assert s.o_direct is direct
        if not direct:
            assert "disabled by configuration" in s.fallback_reason


@pytest.mark.parametrize("value", ["", "2", "enable", "truee", "y"])
def test_environment_toggle_rejects_loose_values(tmp_path: Path, clean_env, value: str) -> None:
    clean_env.setenv("DYN_KVBM_DISK_DISABLE_O_DIRECT", value)
    with pytest.raises(EnvError, match="DYN_KVBM_DISK_DISABLE_O_DIRECT"):
        DiskStorage(tmp_path, 2, 4096)
    assert entries(tmp_path) == []


def test_argument_toggle_and_require_conflict(tmp_path: Path, clean_env) -> None:
    with DiskStorage(tmp_path, 2, 4096, o_direct=False) as s:
        assert s.o_direct is False
    clean_env.setenv("DYNBLOCK_DISABLE_O_DIRECT", "yes")
    with pytest.raises(ValueError, match="conflicts"):
        DiskStorage(tmp_path, 2, 4096, o_direct="require")


def _dirty_fraction(path: Path, offset: int, length: int) -> float:
    """Share of the file's pages in ``offset..offset+length`` that the page
    cache holds dirty (not yet handed to the device), from the pages' own
    flags (``/proc/self/pagemap`` and ``/proc/kpageflags``; root only)."""
    import mmap

    page = mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        m = mmap.mmap(fd, offset + length, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)
    try:
        view = np.frombuffer(m, dtype=np.uint8)[offset:]
        int(view[::page].sum())  # map every page (a read dirties nothing)
        first = (view.ctypes.data // page) * 8
        with open("/proc/self/pagemap", "rb") as pm:
            entries = np.frombuffer(os.pread(pm.fileno(), length // page * 8, first), dtype=np.uint64)
        del view
    finally:
        m.close()
    present = (entries >> np.uint64(63)) & np.uint64(1) == 1
    pfns = entries & np.uint64((1 << 55) - 1)
    if not present.all() or not pfns.any():
        pytest.skip("page frame numbers are not readable here (/proc/self/pagemap needs root)")
    kpf_dirty = 4
    with open("/proc/kpageflags", "rb") as kf:
        dirty = sum(
            int.from_bytes(os.pread(kf.fileno(), 8, int(pfn) * 8), "little") >> kpf_dirty & 1
            for pfn in pfns
        )
    return dirty / len(pfns)


def test_a_large_buffered_batch_starts_write_back_while_it_writes(tmp_path: Path, clean_env) -> None:
    """A buffered write batch hands its pages to the device while it copies
    (a second thread starts write-back every few MiB), so little of it is
    left dirty when the batch returns; a batch smaller than one start leaves
    write-back to the kernel."""
    if not os.access("/proc/kpageflags", os.R_OK):
        pytest.skip("/proc/kpageflags is not readable (needs root)")
    bs = 64 << 10
    n = (128 << 20) // bs
    path = tmp_path / "buffered.bin"
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, n * bs, dtype=np.uint8)
    with DiskStorage(path, n, bs, o_direct=False, persist=True, lock=False) as s:
        assert s.o_direct is False
        s.write_blocks(np.arange(n, dtype=np.uint64), np.zeros(n * bs, np.uint8))
        s.sync()
        small = 64  # 4 MiB: below one start of write-back
        s.write_blocks(np.arange(small, dtype=np.uint64), data[: small * bs])
        assert _dirty_fraction(path, s.data_offset, small * bs) > 0.9
        s.sync()
        order = rng.permutation(n).astype(np.uint64)
        s.write_blocks(order, data)
        # Started every 8 MiB of 128: what was written since the last start
        # is still dirty, the rest is on its way or on the device.
        assert _dirty_fraction(path, s.data_offset, n * bs) < 0.5
        s.sync()
        assert _dirty_fraction(path, s.data_offset, n * bs) == 0
        out = np.empty_like(data)
        s.read_blocks(order, out)
        assert np.array_equal(out, data)


# --- space ------------------------------------------------------------------


def test_capacity_is_checked_before_creating_anything(tiny_tmpfs: Path, clean_env) -> None:
    with pytest.raises(CapacityError) as ei:
        DiskStorage(tiny_tmpfs, 64, 1 << 20)
    msg = str(ei.value)
    assert str(tiny_tmpfs) in msg and "need 67108864 bytes" in msg and "available" in msg
    with pytest.raises(CapacityError):
        DiskStorage(tiny_tmpfs / "kv.bin", 64, 1 << 20, persist=True)
    assert entries(tiny_tmpfs) == []


def test_enospc_during_io_is_reported_and_storage_survives(tiny_tmpfs: Path, clean_env) -> None:
    s = DiskStorage(tiny_tmpfs, 12, 1 << 20, preallocate="sparse")
    first = rand_blocks(1, 1 << 20, seed=5)
    s.write_blocks([0], first)
    filler = fill_up(tiny_tmpfs)
    with pytest.raises(OSError) as ei:
        s.write_blocks([5, 6, 7], rand_blocks(3, 1 << 20, seed=6))
    assert ei.value.errno == errno.ENOSPC
    assert "pwrite" in str(ei.value) and "offset" in str(ei.value)
    # still usable: earlier data reads back; after space is freed writes work
    out = np.zeros(1 << 20, dtype=np.uint8)
    s.read_blocks([0], out)
    assert np.array_equal(out, first)
    filler.unlink()
    s.write_blocks([5], first)
    s.read_blocks([5], out)
    assert np.array_equal(out, first)
    s.close()
    assert entries(tiny_tmpfs) == []


def test_enospc_inside_a_ring_batch_is_reported_and_storage_survives(tiny_tmpfs: Path,
                                                                     clean_env) -> None:
    # Three runs of slots from aligned memory: io_uring issues them together and
    # the ones the full filesystem refuses are done again synchronously, which
    # reports the first failure as the pool would.
    _need_io_uring(tiny_tmpfs)
    s = DiskStorage(tiny_tmpfs, 12, 1 << 20, preallocate="sparse", engine="io_uring")
    if not s.o_direct:
        pytest.skip(f"tmpfs here refuses O_DIRECT ({s.fallback_reason}): the ring carries direct I/O only")
    first = _aligned_copy(rand_blocks(1, 1 << 20, seed=5))
    s.write_blocks([0], first)
    filler = fill_up(tiny_tmpfs)
    with pytest.raises(OSError) as ei:
        s.write_blocks([5, 7, 9], _aligned_copy(rand_blocks(3, 1 << 20, seed=6)))
    assert ei.value.errno == errno.ENOSPC
    assert "pwrite" in str(ei.value) and "offset" in str(ei.value)
    out = _aligned_copy(np.zeros(2 << 20, dtype=np.uint8))
    s.read_blocks([0, 3], out)
    assert np.array_equal(out[: 1 << 20], first)
    filler.unlink()
    both = _aligned_copy(np.concatenate([first, first[::-1]]))
    s.write_blocks([5, 9], both)
    s.read_blocks([5, 9], out)
    assert np.array_equal(out, both)
    s.close()
    assert entries(tiny_tmpfs) == []


def test_a_kernel_that_refuses_io_uring(tmp_path: Path, clean_env) -> None:
    # kernel.io_uring_disabled=2 refuses every io_uring_setup: "auto" runs on the
    # worker pool, "io_uring" is refused at open saying why. The knob is global, so
    # it is held only around the two opens and put back whatever happens.
    knob = Path("/proc/sys/kernel/io_uring_disabled")
    if not knob.exists():
        pytest.skip("this kernel has no kernel.io_uring_disabled (it came in Linux 6.6)")
    if os.geteuid() != 0:
        pytest.skip("setting kernel.io_uring_disabled needs root")
    old = knob.read_text().strip()
    try:
        knob.write_text("2")
    except OSError as e:
        pytest.skip(f"kernel.io_uring_disabled cannot be set here: {e}")
    try:
        s = DiskStorage(tmp_path, 8, 4096)
        with pytest.raises(OSError, match="io_uring_disabled") as ei:
            DiskStorage(tmp_path, 8, 4096, engine="io_uring")
    finally:
        knob.write_text(old)
    assert "disk_engine=\"auto\"" in str(ei.value)
    with s:
        assert s.engine == "threads"
        src = _aligned_copy(rand_blocks(3, 4096, seed=2))
        s.write_blocks([6, 0, 3], src)
        dst = _aligned_copy(np.zeros_like(src))
        s.read_blocks([6, 0, 3], dst)
        assert np.array_equal(src, dst)
    assert entries(tmp_path) == []


def _need_io_uring(d: Path) -> None:
    with DiskStorage(d, 1, 4096) as probe:
        if probe.engine != "io_uring":
            pytest.skip("this kernel refuses io_uring (kernel.io_uring_disabled or a seccomp "
                        "filter): the ring engine cannot be tested here")


def test_zero_fill_where_fallocate_is_unsupported(ramfs_dir: Path, clean_env) -> None:
    # ramfs has no fallocate: "auto" zero-fills, so the file has its full size
    with DiskStorage(ramfs_dir / "kv.bin", 4, 4096, persist=True) as s:
        assert s.data_offset == 4096  # the store's header
        assert os.path.getsize(ramfs_dir / "kv.bin") == s.file_size == 4096 + 4 * 4096
        out = np.ones(4096, dtype=np.uint8)
        s.read_blocks([3], out)
        assert not out.any()


def _extents(path: Path) -> list:
    """The file's extents from the kernel (``FS_IOC_FIEMAP``): (logical
    offset, length, unwritten?) each."""
    import fcntl
    import struct

    head, ext = "=QQLLLL", "=QQQQQLLLL"
    count = 4096
    req = bytearray(struct.pack(head, 0, 2**64 - 1, 1, 0, count, 0)
                    + bytes(struct.calcsize(ext) * count))  # fm_flags 1: FIEMAP_FLAG_SYNC
    with open(path, "rb") as f:
        fcntl.ioctl(f.fileno(), 0xC020660B, req)  # FS_IOC_FIEMAP
    mapped = struct.unpack_from(head, req)[3]
    out = []
    for i in range(mapped):
        e = struct.unpack_from(ext, req, struct.calcsize(head) + i * struct.calcsize(ext))
        out.append((e[0], e[2], bool(e[5] & 0x800)))  # FIEMAP_EXTENT_UNWRITTEN
    return out


def test_zero_preallocation_leaves_no_unwritten_space(tmp_path: Path, clean_env) -> None:
    """``fallocate`` reserves space as unwritten extents (each slot's first
    write also converts its part); ``preallocate="zero"`` writes the file at
    creation, so every slot is written space from the start."""
    bs, n = 1 << 20, 16
    with DiskStorage(tmp_path / "auto.bin", n, bs, persist=True) as s:
        if s.fs_type not in ("ext4", "xfs"):
            pytest.skip(f"unwritten extents are an ext4/XFS matter; {tmp_path} is {s.fs_type}")
        assert s.preallocation == "fallocate"
        unwritten = sum(ln for _, ln, u in _extents(tmp_path / "auto.bin") if u)
        assert unwritten >= n * bs  # every slot (the header was written)
        s.write_blocks([3], np.ones(bs, np.uint8))
        assert sum(ln for _, ln, u in _extents(tmp_path / "auto.bin") if u) == unwritten - bs
    with DiskStorage(tmp_path / "zero.bin", n, bs, persist=True, preallocate="zero") as s:
        assert s.preallocation == "zero-fill"
        ext = _extents(tmp_path / "zero.bin")
        assert ext and not any(u for _, _, u in ext)
        assert sum(ln for _, ln, _ in ext) >= s.file_size
        out = np.ones(n * bs, np.uint8)
        s.read_blocks(list(range(n)), out)
        assert not out.any()


# --- files left behind ------------------------------------------------------


def test_no_file_left_after_close_or_exception(tmp_path: Path, clean_env) -> None:
    s = DiskStorage(tmp_path, 4, 4096)
    assert entries(tmp_path) == []  # anonymous from the start
    s.close()
    s.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        s.read_blocks([0], np.zeros(4096, dtype=np.uint8))
    try:
        with DiskStorage(tmp_path, 4, 4096) as s2:
            raise RuntimeError("engine crashed")
    except RuntimeError:
        pass
    assert s2.closed
    assert entries(tmp_path) == []


def test_no_file_left_after_kill_9(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys, time, numpy as np, dynblock
        s = dynblock.DiskStorage({str(tmp_path)!r}, 64, 1 << 20)
        s.write_blocks(list(range(64)), np.ones(64 << 20, dtype=np.uint8))
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        fds = os.listdir(f"/proc/{p.pid}/fd")
        held = [os.readlink(f"/proc/{p.pid}/fd/{fd}") for fd in fds]
        assert any(str(tmp_path) in h for h in held), held  # it really holds a file there
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert entries(tmp_path) == []


# --- persistence ------------------------------------------------------------


def test_persist_creates_0600_and_reopens(tmp_path: Path, clean_env) -> None:
    path = tmp_path / "cache.bin"
    src = rand_blocks(2, 4096, seed=4)
    with DiskStorage(path, 4, 4096, persist=True) as s:
        assert not s.anonymous and s.path == str(path)
        s.write_blocks([1, 3], src)
        s.sync()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with DiskStorage(path, 4, 4096, persist=True) as s:
        dst = np.zeros_like(src)
        s.read_blocks([1, 3], dst)
        assert np.array_equal(src, dst)
    with pytest.raises(ValueError, match="was made with block_size 4096 and 4 blocks; this open "
                                         "asks for block_size 4096 and 8 blocks"):
        DiskStorage(path, 8, 4096, persist=True)
    assert path.exists()  # a refused reopen never deletes the user's file


def test_persist_refuses_symlinks_and_directories(tmp_path: Path, clean_env) -> None:
    target = tmp_path / "target.bin"
    target.write_bytes(b"")
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    with pytest.raises(ValueError, match="symbolic link"):
        DiskStorage(link, 4, 4096, persist=True)
    with pytest.raises(ValueError, match="directory"):
        DiskStorage(tmp_path, 4, 4096, persist=True)
    with pytest.raises(ValueError, match="not a directory"):
        DiskStorage(target, 4, 4096)
    assert target.read_bytes() == b""


# --- bad input changes nothing ----------------------------------------------


@pytest.fixture
def filled(tmp_path: Path, clean_env):
    s = DiskStorage(tmp_path, 4, 4096)
    src = rand_blocks(4, 4096, seed=11)
    s.write_blocks([0, 1, 2, 3], src)
    yield s, src
    s.close()


def _unchanged(s: DiskStorage, src: np.ndarray) -> None:
    dst = np.zeros_like(src)
    s.read_blocks([0, 1, 2, 3], dst)
    assert np.array_equal(dst, src)


@pytest.mark.parametrize(
    "slots,nbytes,exc,match",
    [
        ([0, 4], 2 * 4096, IndexError, "slot id 4 at position 1 is out of range"),
        ([1, 2], 4096, ValueError, "need exactly 8192"),
        ([1, 2], 3 * 4096, ValueError, "need exactly 8192"),
        ([2, 1, 2], 3 * 4096, ValueError, "more than once"),
        ([0, -1], 2 * 4096, ValueError, r"slot_ids\[1\]"),
        ([0.0], 4096, ValueError, r"slot_ids\[0\]"),
        ([True], 4096, TypeError, "bool"),
        ("ab", 2 * 4096, TypeError, "slot_ids"),
    ],
)
def test_bad_writes_change_nothing(filled, slots, nbytes, exc, match) -> None:
    s, src = filled
    with pytest.raises(exc, match=match):
        s.write_blocks(slots, np.full(nbytes, 0xAB, dtype=np.uint8))
    _unchanged(s, src)


def test_bad_buffers(filled) -> None:
    s, src = filled
    with pytest.raises(BufferError, match="read-only"):
        s.read_blocks([0], bytes(4096))
    ro = np.zeros(4096, dtype=np.uint8)
    ro.flags.writeable = False
    with pytest.raises(BufferError, match="dst is read-only"):
        s.read_blocks([0], ro)
    strided = np.zeros(2 * 4096, dtype=np.uint8)[::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        s.write_blocks([0], strided)
    with pytest.raises(TypeError, match="buffer protocol"):
        s.write_blocks([0], object())
    with pytest.raises(TypeError, match="integers"):
        s.read_blocks(np.array([0.0]), np.zeros(4096, dtype=np.uint8))
    with pytest.raises(ValueError, match="negative"):
        s.read_blocks(np.array([-1], dtype=np.int64), np.zeros(4096, dtype=np.uint8))
    _unchanged(s, src)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(num_blocks=0), ValueError, r"num_blocks \(slots in the tier\) must be between 1 and"),
        (dict(num_blocks=-3), ValueError, "num_blocks"),
        (dict(num_blocks=2.5), TypeError, "num_blocks must be an int"),
        (dict(num_blocks=True), TypeError, "num_blocks"),
        (dict(block_size=0), ValueError, "block_size"),
        (dict(io_depth=0), ValueError, "io_depth"),
        (dict(o_direct="yes"), ValueError, "o_direct"),
        (dict(preallocate="lazy"), ValueError, "preallocate"),
        (dict(alignment=(3, 512)), dynblock.AlignmentError, "power of two"),
        (dict(num_blocks=2**62, block_size=2**20), ValueError, "num_blocks .* got 4611686018427387904"),
        (dict(num_blocks=2**32 - 3, block_size=2**32), ValueError, "too large"),
    ],
)
def test_bad_constructor_arguments(tmp_path: Path, clean_env, kwargs, exc, match) -> None:
    args = dict(num_blocks=4, block_size=4096)
    args.update(kwargs)
    nb, bs = args.pop("num_blocks"), args.pop("block_size")
    with pytest.raises(exc, match=match):
        DiskStorage(tmp_path, nb, bs, **args)
    assert entries(tmp_path) == []


def test_missing_directory(tmp_path: Path, clean_env) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        DiskStorage(tmp_path / "nope", 4, 4096)
    with pytest.raises(ValueError, match="does not exist"):
        DiskStorage(tmp_path / "nope" / "kv.bin", 4, 4096, persist=True)


# --- registered buffers -----------------------------------------------------


def _shared(nbytes: int) -> "tuple[object, np.ndarray]":
    """Memory as vLLM's primary tier is: a shared mapping, on small pages."""
    import mmap

    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_SHARED)
    return region, np.frombuffer(region, dtype=np.uint8)


def test_a_registered_buffer_moves_the_same_bytes_without_pinning_per_io(
        tmp_path: Path, clean_env) -> None:
    _need_io_uring(tmp_path)
    bs = 256 << 10
    with DiskStorage(tmp_path, 16, bs) as s:
        _region, buf = _shared(8 * bs)
        buf[:] = rand_blocks(8, bs, seed=3)
        rid = s.register_buffer(buf)
        assert rid is not None, s.registration
        assert s.registration[:2] == (8 * bs, 0)
        s.write_blocks([9, 2, 3, 4, 12, 0, 1, 15], buf)  # runs of adjacent slots: vectored
        want = buf.copy()
        buf[:] = 0
        s.read_blocks([9, 2, 3, 4, 12, 0, 1, 15], buf)
        assert np.array_equal(buf, want)
        fixed = s.registration[1]
        assert fixed > 0
        # Part of it, from an offset inside the registered memory.
        s.read_blocks([0, 1], buf[2 * bs:4 * bs])
        assert np.array_equal(buf[2 * bs:4 * bs], want[5 * bs:7 * bs])
        assert s.registration[1] > fixed
        # Memory outside it goes the usual way, and after unregistering nothing is fixed.
        other = _aligned_copy(np.zeros(bs, np.uint8))
        fixed = s.registration[1]
        s.read_blocks([15], other)
        assert s.registration[1] == fixed and np.array_equal(other, want[7 * bs:])
        assert s.unregister_buffer(rid) is True and s.unregister_buffer(rid) is False
        assert s.registration[0] == 0
        s.read_blocks([9], buf[:bs])
        assert s.registration[1] == fixed and np.array_equal(buf[:bs], want[:bs])
        with pytest.raises(TypeError, match="registration must be an id"):
            s.unregister_buffer("1")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="empty"):
            s.register_buffer(buf[:0])
        assert s.register_buffer(buf) is not None
    assert s.registration[0] == 0  # close() let go of it
    with pytest.raises(ValueError, match="DiskStorage is closed"):
        s.register_buffer(buf)


def test_huge_page_memory_is_left_unregistered(tmp_path: Path, clean_env) -> None:
    import mmap

    _need_io_uring(tmp_path)
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        pytest.skip("this Python's mmap has no MADV_HUGEPAGE")
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are off on this kernel")
    region = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_PRIVATE)  # anonymous, advised for huge pages
    region.madvise(mmap.MADV_HUGEPAGE)
    buf = np.frombuffer(region, dtype=np.uint8)
    with DiskStorage(tmp_path, 4, 1 << 20) as s:
        assert s.register_buffer(buf) is None
        assert "huge pages" in (s.registration[2] or "") and s.registration[0] == 0
        buf[:] = 5
        s.write_blocks([0, 1, 2, 3], buf)  # the usual way
        out = _aligned_copy(np.zeros(4 << 20, np.uint8))
        s.read_blocks([0, 1, 2, 3], out)
        assert (out == 5).all() and s.registration[1] == 0


def test_close_forgets_registrations_and_a_manager_registers_through_its_disk(
        tmp_path: Path, clean_env) -> None:
    from dynblock import BlockManager, Config

    _need_io_uring(tmp_path)
    bs = 64 << 10
    _region, src = _shared(32 * bs)
    src[:] = rand_blocks(32, bs, seed=5)
    _region2, dst = _shared(32 * bs)
    cfg = Config(block_size=bs, host_blocks=0, disk_blocks=64, disk_dir=str(tmp_path),
                 numa_node=None, pin=False)
    with BlockManager(cfg) as m:
        assert m.register_buffer(src) is not None and m.register_buffer(dst) is not None
        assert m.put(list(range(32)), src) == 32
        assert m.get(list(range(32)), dst) == 32 and np.array_equal(src, dst)
        d = m.stats()["disk"]
        assert d["registered_bytes"] == 64 * bs and d["fixed_ios"] > 0
    with pytest.raises(ValueError, match="closed"):
        m.register_buffer(src)
    with BlockManager(Config(block_size=bs, host_blocks=4, numa_node=None, pin=False)) as h:
        assert h.register_buffer(src) is None  # no disk tier: nothing to register with


def test_a_registration_the_kernel_refuses_leaves_the_io_as_it_was(tmp_path: Path) -> None:
    # Without CAP_IPC_LOCK registered buffers count against RLIMIT_MEMLOCK: 4 MiB over a limit of
    # 64 KiB is refused; the call says None and why, and the I/O goes the usual way.
    import shutil

    _need_io_uring(tmp_path)
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed: cannot drop CAP_IPC_LOCK")
    code = textwrap.dedent(f"""
        import json, mmap, resource
        import numpy as np
        from dynblock import DiskStorage
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (65536, 65536))
        region = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_SHARED)
        buf = np.frombuffer(region, dtype=np.uint8)
        buf[:] = 9
        with DiskStorage({str(tmp_path)!r}, 8, 1 << 20) as s:
            rid = s.register_buffer(buf)
            s.write_blocks([0, 1, 2, 3], buf)
            buf[:] = 0
            s.read_blocks([0, 1, 2, 3], buf)
            print(json.dumps({{"rid": rid, "reg": s.registration, "ok": bool((buf == 9).all())}}))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DYNBLOCK_", "DYN_"))}
    r = subprocess.run(["setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock",
                        sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["rid"] is None and out["ok"], out
    registered, fixed, why = out["reg"]
    assert (registered, fixed) == (0, 0) and "refused to register" in why, out
