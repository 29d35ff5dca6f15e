"""`get` of disk hits (each promoted into the host tier), into an aligned and an
unaligned destination: the number behind the disk-hit walk (read into the host
slot a block is promoted to, then copied out once).

Run it under two builds, interleaved, and compare (the machine is noisy):

    for i in 1 2 3; do for py in OLD/bin/python NEW/bin/python; do
        $py benches/disk_hit_get.py --dir /var/tmp; done; done

Prints one JSON line per case: GiB/s of the gets (median of --repeat runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np

import dynblock
from dynblock import BlockManager, Config
from dynblock.buffers import aligned_empty


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--block-size", type=int, default=256 << 10)
    ap.add_argument("--working-bytes", type=int, default=512 << 20)
    ap.add_argument("--host-fraction", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    bs, w = a.block_size, a.working_bytes // a.block_size
    host = max(1, int(w * a.host_fraction))
    src = aligned_empty(w * bs)
    src[:] = np.random.default_rng(1).integers(0, 256, w * bs, dtype=np.uint8)
    hashes = np.arange(1, w + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    for label, offset in (("aligned", 0), ("unaligned", 64)):
        out_all = aligned_empty(a.batch * bs + 4096)
        out_all.fill(0)  # touched before timing
        out = out_all[offset:offset + a.batch * bs]
        rates = []
        for _ in range(a.repeat):
            cfg = Config(block_size=bs, host_blocks=host, disk_blocks=w, disk_dir=a.dir,
                         write_behind=False, numa_node=None, pin=False)
            with BlockManager(cfg) as m:
                m.put(hashes, src)
                # Every block is on disk; the host tier holds the last `host` put.
                order = np.random.default_rng(2).permutation(w - host)
                t0 = time.perf_counter()
                for i in range(0, len(order), a.batch):
                    idx = order[i:i + a.batch]
                    got = m.get(hashes[idx], out[:len(idx) * bs])
                    assert got == len(idx)
                t = time.perf_counter() - t0
                st = m.stats()
                assert st["disk_hits"] >= len(order) and st["onboarded_blocks"] >= len(order), st
                i0 = int(order[-len(idx):][0])
                assert np.array_equal(out[:bs], src[i0 * bs:(i0 + 1) * bs])
                rates.append(len(order) * bs / t / 2**30)
        print(json.dumps({"build": dynblock.__file__, "case": f"get disk hits, {label} dst",
                          "block_size": bs, "gib_s": round(statistics.median(rates), 3)}))


if __name__ == "__main__":
    main()
