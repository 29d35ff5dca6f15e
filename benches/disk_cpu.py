"""Throughput and CPU seconds per GiB of the disk tier alone, for a few seconds
of batches (random slots, O_DIRECT unless --buffered), so a profiler can be
attached to a steady state:

    python benches/disk_cpu.py --block-size 2MiB --op read --dir /var/tmp &
    perf record -g -p $! -- sleep 4     # once it prints "steady"

CPU is this process's user + system time (every thread). Run it under two
builds, interleaved, to compare them.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

import numpy as np

from dynblock import DiskStorage
from dynblock.bench.common import parse_size
from dynblock.buffers import aligned_empty


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--block-size", type=parse_size, default=2 << 20)
    ap.add_argument("--op", choices=("read", "write"), default="read")
    ap.add_argument("--file-size", type=parse_size, default=256 << 20)
    ap.add_argument("--batch-size", type=parse_size, default=4 << 20)
    ap.add_argument("--io-depth", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--buffered", action="store_true")
    a = ap.parse_args()
    bs = a.block_size
    n = max(1, a.file_size // bs)
    buf = aligned_empty(n * bs)
    buf[:] = 7  # touched before timing
    order = np.random.default_rng(1).permutation(n).astype(np.uint64)
    batch = max(1, a.batch_size // bs)
    with DiskStorage(a.dir, n, bs, io_depth=a.io_depth, o_direct=not a.buffered) as s:
        s.write_blocks(np.arange(n, dtype=np.uint64), buf)
        print("steady", os.getpid(), flush=True)
        call = s.write_blocks if a.op == "write" else s.read_blocks
        c0, t0, moved = cpu_seconds(), time.perf_counter(), 0
        while time.perf_counter() - t0 < a.seconds:
            for i in range(0, n, batch):
                call(order[i:i + batch], buf[i * bs:(i + batch) * bs])
            moved += n * bs
        dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    gib = moved / 2**30
    print(f"{bs >> 10} KiB {a.op} {'buffered' if a.buffered else 'o_direct'}: {gib / dt:.2f} GiB/s, "
          f"{cpu / gib:.3f} CPU s/GiB", file=sys.stdout)


if __name__ == "__main__":
    main()
