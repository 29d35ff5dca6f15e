#!/usr/bin/env python3
"""Worst wall time of get/lookup/match against a server that trickles every reply a byte per
50 ms (remote_timeout_ms=200, 20 calls each, a fresh manager per call). Needs no server
install: the hostile server is the test suite's. Run: python3 benches/engine_path/trickle.py"""
import time

import numpy as np

import _paths  # noqa: F401
import dynblock
from hostile_redis import HostileRedis

BS = 4096
srv = HostileRedis()
url = f"redis://127.0.0.1:{srv.port}"


def cfg(**kw):
    return dynblock.Config(block_size=BS, host_blocks=64, numa_node=None, pin=False, remote=url,
                           remote_timeout_ms=200, **kw)


with dynblock.BlockManager(cfg(remote_write="sync")) as w:
    w.put([1, 2, 3, 4], np.random.default_rng(0).integers(0, 255, 4 * BS, dtype=np.uint8))
out = np.zeros(4 * BS, np.uint8)
calls = {"get": lambda kv: kv.get([1, 2, 3, 4], out),
         "lookup": lambda kv: kv.lookup([1, 2, 3, 4]).release(),
         "match": lambda kv: kv.match(list(range(1, 65)))}
for name, call in calls.items():
    times = []
    for _ in range(20):
        srv.mode = "ok"
        kv = dynblock.BlockManager(cfg())
        srv.mode = "trickle"
        t = time.monotonic()
        call(kv)
        times.append(time.monotonic() - t)
        kv.close(flush=False)
    print(f"{name}: worst {max(times) * 1e3:.1f} ms, p50 {sorted(times)[10] * 1e3:.1f} ms "
          f"(remote_timeout_ms 200)")
srv.close()
