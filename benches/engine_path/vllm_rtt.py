#!/usr/bin/env python3
"""vLLM end to end (the CPU build in .venv-vllm, a tiny random-weight model): engine A writes
100 prompts of 4 blocks to a Redis server; engine B, empty local tiers, runs the same prompts
twice through a proxy 1 ms or 100 ms away (lookup_timeout_ms 50, remote_timeout_ms 200):
requests with a hit and cached tokens per pass, and leases left held at the end.
Run: bash .ci/vllm-env && python3 benches/engine_path/vllm_rtt.py"""
import json
import os
import random
import subprocess
import tempfile
import time
from pathlib import Path

import _paths  # noqa: F401
import test_vllm as T
from delay_proxy import DelayProxy
from redis_servers import Server

tmp = Path(tempfile.mkdtemp())


def run(args, record=None):
    f = tmp / f"args-{time.time_ns()}.json"
    f.write_text(json.dumps(args))  # prompts are too long for one argv string
    env = dict(os.environ, PYTHONPATH=str(T.DRIVER.parent))
    if record is not None:
        env["DYNBLOCK_TEST_RECORD"] = str(record)
    r = subprocess.run([T._vllm_python(), str(T.DRIVER), "@" + str(f)], capture_output=True,
                       text=True, timeout=1500, env=env, cwd=str(T.DRIVER.parent))
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, (r.stdout + r.stderr)[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


model = tmp / "model"
subprocess.run([T._vllm_python(), "-c", f"import driver; driver.make_model({str(model)!r})"],
               cwd=str(T.DRIVER.parent), check=True)
rnd = random.Random(5)
prompts = [[rnd.randrange(1, 1000) for _ in range(4 * T.BLOCK + 10)] for _ in range(100)]
srv = Server(tmp / "redis", [])
try:
    a = T.base_args(model, prompts)
    a["num_blocks"] = 64
    a["connector"] = T.connector(None, remote=f"redis://127.0.0.1:{srv.port}", remote_write="sync",
                                 remote_timeout_ms=2000, host_blocks=16)
    run(a)
    for rtt in (1, 100):
        proxy = DelayProxy(srv.port, rtt / 1000)
        b = T.base_args(model, prompts * 2)
        b["num_blocks"] = 64
        b["connector"] = T.connector(None, remote=f"redis://127.0.0.1:{proxy.port}",
                                     remote_timeout_ms=200, host_blocks=2048)
        rec = tmp / f"record-{rtt}.json"
        res = run(b, record=rec)
        cached = [x["cached"] for x in res["results"]]
        rj = json.loads(rec.read_text())
        for p, part in ((1, cached[:100]), (2, cached[100:])):
            print(f"rtt {rtt} ms, pass {p}: requests with a hit {sum(c > 0 for c in part)}/100, "
                  f"cached tokens {sum(part)}/{100 * 4 * T.BLOCK}")
        print(f"rtt {rtt} ms: leases held at the end {rj['held_leases']}, warmed "
              f"{rj['warmed_blocks']}, remote_deadline_missed "
              f"{rj['store'].get('remote_deadline_missed')}")
        proxy.close()
finally:
    srv.stop()
