#!/usr/bin/env python3
"""The vLLM lookup service (LookupClient with lookup_timeout_ms 50 -> LookupServer ->
LayerStore) against a store with empty local tiers whose blocks are in a Redis server 1 ms and
100 ms away (a delaying proxy): hits, lookup times and leases left held after 100 requests,
asked twice 3 s apart. Run: python3 benches/engine_path/lookup_rtt.py"""
import tempfile
import time
from pathlib import Path

import numpy as np

import _paths  # noqa: F401
from delay_proxy import DelayProxy
from dynblock import Config
from dynblock.vllm.service import LookupClient, LookupServer
from dynblock.vllm.store import LayerStore
from redis_servers import Server

tmp = Path(tempfile.mkdtemp())
srv = Server(tmp / "redis", [])
layout = LayerStore.layout_for(4, 16, [2, 16, 64], "float32")  # 4 layers, 8 KiB blocks
N, PER = 100, 16


def store(url, **kw):
    return LayerStore(Config(layout=layout, host_blocks=4096, numa_node=None, pin=False,
                             remote=url, **kw))


try:
    reqs = [[bytes([r % 256, r // 256, i]) * 11 for i in range(PER)] for r in range(N)]
    w = store(f"redis://127.0.0.1:{srv.port}", remote_write="sync")
    rows = np.random.default_rng(0).integers(0, 255, (PER, w.kv.block_size), dtype=np.uint8)
    for h in reqs:
        for layer in range(w.num_layers):
            w.save(layer, h, rows, list(range(PER)), True).wait()
    w.close()
    for rtt_ms in (1, 100):
        proxy = DelayProxy(srv.port, rtt_ms / 1000)
        st = store(f"redis://127.0.0.1:{proxy.port}", remote_timeout_ms=200)
        server = LookupServer(str(tmp / f"lookup-{rtt_ms}.sock"), st.lookup, st.release)
        client = LookupClient(server.path, timeout=0.05)
        for rnd in (1, 2):
            full, times = 0, []
            for r, h in enumerate(reqs):
                t = time.monotonic()
                c = client.lookup(f"req-{r}-{rnd}", h)
                times.append(time.monotonic() - t)
                full += c == PER
                if c:
                    client.release(f"req-{r}-{rnd}")
                time.sleep(0.02)
            time.sleep(3)
            print(f"rtt {rtt_ms} ms, pass {rnd}: full hits {full}/{N}, lookup p50 "
                  f"{sorted(times)[N // 2] * 1e3:.1f} ms max {max(times) * 1e3:.1f} ms, leases held "
                  f"{len(st._held)}, late {server.late}, warmed {st.warmed_blocks}, "
                  f"warm dropped {st.warm_dropped}")
        client.close()
        server.close()
        st.close()
        proxy.close()
finally:
    srv.stop()
