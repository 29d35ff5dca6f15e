#!/usr/bin/env python3
"""Remote get with remote_secret (a MAC) against without (CRC32C), 256 KiB and 2 MiB blocks,
interleaved, 8 repeats of 64 MiB, on a redis-server started on loopback (apt-get install
redis-server). Run: python3 benches/engine_path/secret_get.py"""
import tempfile
import time
from pathlib import Path

import numpy as np

import _paths  # noqa: F401
import dynblock
from redis_servers import Server

srv = Server(Path(tempfile.mkdtemp()) / "redis", [])
url = f"redis://127.0.0.1:{srv.port}"
try:
    for bs in (256 << 10, 2 << 20):
        n = (64 << 20) // bs
        hs = list(range(1, n + 1))
        src = np.random.default_rng(1).integers(0, 256, n * bs, dtype=np.uint8)
        out = np.ones(n * bs, np.uint8)
        variants = (("mac", "bench-secret", "m"), ("crc", None, "c"))

        def manager(secret, prefix, bs=bs, n=n, **kw):
            return dynblock.BlockManager(dynblock.Config(
                block_size=bs, host_blocks=n, numa_node=None, pin=False, remote=url,
                remote_prefix=prefix, remote_secret=secret, remote_timeout_ms=5000, **kw))

        for _, secret, prefix in variants:
            with manager(secret, prefix, remote_write="sync") as m:
                m.put(hs, src)
        rates = {label: [] for label, _, _ in variants}
        for _ in range(8):
            for label, secret, prefix in variants:
                with manager(secret, prefix) as m:  # empty local tiers: all from the server
                    t = time.perf_counter()
                    assert m.get(hs, out) == n
                    rates[label].append(n * bs / (time.perf_counter() - t) / 2**30)
        mac, crc = np.median(rates["mac"]), np.median(rates["crc"])
        print(f"{bs >> 10} KiB get: mac {mac:.2f} GiB/s, crc {crc:.2f} GiB/s, ratio {mac / crc:.2f}")
finally:
    srv.stop()
