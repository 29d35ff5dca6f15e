"""What users would otherwise use, measured in the same run: fio (the device
limit), naive Python file I/O, numpy tofile/fromfile, numpy copyto."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from typing import List, Optional, Sequence

import numpy as np

FIO_INSTALL_HINT = (
    "fio is not installed, so the device limit (fio direct=1 at its best depth) is not "
    "measured and no ratio to it is printed; install it (Debian/Ubuntu: `apt-get install fio`, "
    "Fedora/RHEL: `dnf install fio`, macOS: not supported) and run again"
)


class Fio:
    """Runs fio jobs with ``direct=1`` and returns bytes/s."""

    def __init__(self, executable: Optional[str] = None, enabled: bool = True) -> None:
        self.exe = (executable or shutil.which("fio")) if enabled else None
        self.engine: Optional[str] = None
        self.error: Optional[str] = None
        #: CPU seconds per GiB of the last successful job (fio's own usr + sys over its runtime).
        self.cpu_s_per_gib: Optional[float] = None
        if not enabled:
            self.error = "fio skipped (--no-fio)"
        elif not self.exe:
            self.error = FIO_INSTALL_HINT

    @property
    def available(self) -> bool:
        return self.exe is not None and self.error is None

    def _cmd(self, path: str, rw: str, bs: int, size: int, depth: int, engine: str,
             offset: int) -> List[str]:
        assert self.exe is not None
        return [
            self.exe, "--name=dynblock-bench", f"--filename={path}", f"--rw={rw}",
            f"--bs={bs}", f"--offset={offset}", f"--size={size}", "--direct=1",
            f"--ioengine={engine}",
            f"--iodepth={depth}", "--numjobs=1", "--output-format=json", "--randrepeat=0",
            "--invalidate=1", "--fallocate=none",
        ]

    def run(self, path: str, rw: str, bs: int, size: int, depth: int,
            offset: int = 0) -> Optional[float]:
        """bytes/s of one fio job over ``size`` bytes from ``offset`` (a store's
        slots start after its header), or None (with ``self.error`` set) when
        fio cannot run."""
        if not self.exe:
            return None
        engines = [self.engine] if self.engine else ["libaio", "io_uring", "psync"]
        last = ""
        for engine in engines:
            assert engine is not None
            try:
                r = subprocess.run(self._cmd(path, rw, bs, size, depth, engine, offset),
                                   capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired) as e:
                last = str(e)
                continue
            try:
                job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
            except (ValueError, KeyError, IndexError):
                last = (r.stderr or r.stdout).strip()[-300:]
                continue
            if job.get("error"):
                last = f"fio job error {job['error']}: {r.stderr.strip()[-200:]}"
                continue
            self.engine = engine
            side = "read" if "read" in rw else "write"
            bw = float(job[side]["bw_bytes"])
            if bw <= 0:
                last = "fio reported zero bandwidth"
                continue
            runtime_s = float(job.get("job_runtime", 0)) / 1000.0
            moved = float(job[side].get("io_bytes", 0))
            self.cpu_s_per_gib = None
            cpu_s = (float(job.get("usr_cpu", 0)) + float(job.get("sys_cpu", 0))) / 100.0 * runtime_s
            if cpu_s > 0 and moved > 0:  # 0: a job too short for fio's CPU accounting
                self.cpu_s_per_gib = cpu_s / (moved / (1 << 30))
            return bw
        self.error = f"fio could not run on {path}: {last}"
        return None


def naive_python(path: str, order: Sequence[int], bs: int, buf: np.ndarray, offset: int = 0):
    """Plain Python file I/O (buffered, then fsync / cold reads) at the same
    block size and order, slot ``i`` at ``offset + i * bs``."""
    mv = memoryview(buf).cast("B")  # type: ignore[arg-type]

    def write() -> None:
        with open(path, "r+b", buffering=0) as f:
            for i, slot in enumerate(order):
                f.seek(offset + int(slot) * bs)
                f.write(mv[i * bs:(i + 1) * bs])
            os.fsync(f.fileno())

    def read() -> None:
        with open(path, "rb", buffering=0) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            for i, slot in enumerate(order):
                f.seek(offset + int(slot) * bs)
                f.readinto(mv[i * bs:(i + 1) * bs])

    return write, read


def numpy_file(path: str, buf: np.ndarray, offset: int = 0):
    """numpy tofile/fromfile of the whole array (sequential by nature), from
    ``offset``."""

    def write() -> None:
        with open(path, "r+b") as f:
            f.seek(offset)
            buf.tofile(f)
            f.flush()
            os.fsync(f.fileno())

    def read() -> None:
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            f.seek(offset)
            out = np.fromfile(f, dtype=buf.dtype, count=buf.size)
        if out.size != buf.size:
            raise RuntimeError("numpy.fromfile read less than was written")

    return write, read


def copyto_threads(dst: np.ndarray, src: np.ndarray, threads: int) -> None:
    """numpy copyto split over ``threads`` threads (numpy releases the GIL)."""
    if threads <= 1:
        np.copyto(dst, src)
        return
    n = src.size
    step = -(-n // threads)
    ts = [
        threading.Thread(target=np.copyto, args=(dst[i:i + step], src[i:i + step]))
        for i in range(0, n, step)
    ]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
