"""The bench's ``remote`` workload: the Redis/Valkey remote tier against
redis-py (``pip install redis``), on servers this workload starts on loopback
ports (``redis-server``; a 3-master cluster with ``redis-cli --cluster
create``) and stops.

- get of 256 KiB and 2 MiB blocks through the remote tier (a manager with
  empty local tiers) against redis-py pipelined ``MGET`` of the same keys
  (values copied into one buffer, as an engine needs them);
- ``put`` with ``remote_write="async"``: the caller-visible time against the
  same put without a remote, each put carrying new bytes (as an engine's do);
  also reported with every put from one cache-resident buffer;
- a 3-master cluster against 1 server, 4 client threads getting;
- ``remote_secret`` on against off: ``put`` with ``remote_write="sync"`` and ``get`` (empty
  local tiers) at 256 KiB and 2 MiB, values with a keyed BLAKE3 MAC against CRC32C ones.

The servers run at nice 10: they stand in for other machines, so their CPU time
does not come out of the client's (on a 2-core machine a server at the same
priority as the client doubles the caller-visible time of async puts).
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from typing import Any, List

import numpy as np

from ..config import Config
from ..manager import BlockManager
from .common import Progress, Results, timed, timed_call

HEADER = 32  # bytes before the block in a remote value without a secret (rust/remote/mod.rs)


def _port() -> int:
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = int(s.getsockname()[1])
        if p <= 55535:  # a cluster node also uses port + 10000
            return p
    raise RuntimeError("no free loopback port")


class _Server:
    def __init__(self, directory: str, extra: List[str]) -> None:
        os.makedirs(directory, exist_ok=True)
        self.port = _port()
        exe = shutil.which("redis-server")
        assert exe is not None
        # The server stands in for another machine: at nice 10 its CPU time does not come out
        # of the client's (on a small machine it otherwise competes with the engine's threads).
        nice = shutil.which("nice")
        prefix = [nice, "-n", "10"] if nice else []
        self.proc = subprocess.Popen(
            [*prefix, exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", directory, "--save", "",
             "--appendonly", "no", "--protected-mode", "no", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def flushall(self) -> None:
        """Drop every key (outside any timing), so the server's memory stays the size of one
        case's data instead of growing through the whole run. Needs redis-cli."""
        cli = shutil.which("redis-cli")
        if cli is not None:
            subprocess.run([cli, "-p", str(self.port), "FLUSHALL", "SYNC"], capture_output=True,
                           timeout=120, check=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _manager(url: str, bs: int, n: int, **kw: Any) -> BlockManager:
    return BlockManager(Config(block_size=bs, host_blocks=n, numa_node=None, pin=False,
                               remote=url, remote_timeout_ms=5000, **kw))


def run_remote(res: Results, directory: str, repeat: int, progress: Progress,
               total: int = 64 << 20) -> None:
    if shutil.which("redis-server") is None:
        res.note("remote workload skipped: redis-server is not installed "
                 "(apt-get install redis-server redis-tools)")
        return
    redis_py: Any
    try:
        redis_py = importlib.import_module("redis")
    except ImportError:
        redis_py = None
        res.note("remote: redis-py is not installed (pip install redis): no MGET baseline")
    servers: List[_Server] = []
    try:
        one = _Server(os.path.join(directory, "redis-one"), [])
        servers.append(one)
        url = f"redis://127.0.0.1:{one.port}"
        sizes = [256 << 10, 2 << 20]
        progress.add(len(sizes) * repeat * 2 + 4 * repeat + 2)
        for bs in sizes:
            n = max(1, total // bs)
            hs = list(range(1, n + 1))
            src = np.random.default_rng(bs).integers(0, 256, n * bs, dtype=np.uint8)
            with _manager(url, bs, n, remote_write="sync") as m:
                m.put(hs, src)
            keys = [f"dynblock:{0:016x}:{bs}:{h:016x}" for h in hs]
            out = np.zeros(n * bs, np.uint8)
            out[:] = 1  # touched before timing
            a = res.case("remote", "dynblock", "get", block_size=bs)
            b = res.case("remote", "redis-py-mget", "get", block_size=bs)
            client = redis_py.Redis(port=one.port) if redis_py else None
            for _ in range(repeat):
                with _manager(url, bs, n) as m:  # empty local tiers: every block from the remote
                    got, dt = timed_call(m.get, hs, out)
                assert got == n and np.array_equal(out, src), "remote get returned wrong bytes"
                a.add_rate(n * bs, dt)
                progress.step(f"remote get {bs >> 10} KiB")
                if client is not None:
                    def mget_all(client: Any = client, n: int = n, keys: List[str] = keys,
                                 out: np.ndarray = out, bs: int = bs) -> None:
                        for i in range(0, n, 64):
                            pipe = client.pipeline(transaction=False)
                            pipe.mget(keys[i:i + 64])
                            (vals,) = pipe.execute()
                            for j, v in enumerate(vals):
                                k = i + j
                                out[k * bs:(k + 1) * bs] = np.frombuffer(v, np.uint8, bs, HEADER)

                    b.add_rate(n * bs, timed(mget_all))
                progress.step(f"redis-py mget {bs >> 10} KiB")
            if b.values:
                a.ratios["vs_redis_py_mget"] = a.median / b.median
            else:
                res.cases.remove(b)
            one.flushall()
        _async_put(res, one, repeat, progress)
        _secret_vs_none(res, one, repeat, progress, total)
        # 3-master cluster vs 1 server, 4 client threads getting
        _cluster_vs_one(res, directory, url, servers, repeat, progress)
    finally:
        for s in servers:
            s.stop()


def _async_put(res: Results, server: _Server, repeat: int, progress: Progress) -> None:
    """put with remote_write="async": what the caller waits for, against the same put without a
    remote. 32 blocks of 256 KiB per put, a put every ~4 ms (engine steps). Each put carries new
    bytes from one of 8 source buffers (64 MiB, twice this machine's L3 cache), as an engine's
    puts carry new KV data. Also reported: every put from one 8 MiB buffer, which stays in the
    CPU cache when nothing else runs; the background writer's traffic evicts it, so there the
    ratio also counts the copy reading from memory instead of the cache."""
    url = f"redis://127.0.0.1:{server.port}"
    bs, n = 256 << 10, 32
    rng = np.random.default_rng(7)
    rotating = [rng.integers(0, 256, n * bs, dtype=np.uint8) for _ in range(8)]
    for label, sources in (("put-32", rotating), ("put-32-same-source", rotating[:1])):
        a = res.case("remote", "dynblock-async", label, unit="ms median", block_size=bs)
        b = res.case("remote", "dynblock-no-remote", label, unit="ms median", block_size=bs)
        for r in range(repeat):
            for case, remote in ((a, url), (b, None)):
                cfg = Config(block_size=bs, host_blocks=64 * 32, numa_node=None, pin=False,
                             remote=remote, remote_timeout_ms=5000)
                with BlockManager(cfg) as m:
                    times = []
                    for k in range(48):
                        base = k * n + r * 10_000_000 + 1
                        src = sources[k % len(sources)]
                        t0 = time.perf_counter()
                        m.put(list(range(base, base + n)), src)
                        times.append(time.perf_counter() - t0)
                        time.sleep(0.004)  # engine steps, a few ms apart
                    case.values.append(float(np.median(times)) * 1e3)
                    if remote:
                        m.flush()
                        s = m.stats()
                        case.extra["remote_skipped"] = case.extra.get("remote_skipped", 0) + s["remote_skipped"]
                        server.flushall()
                progress.step("remote async put")
        a.ratios["vs_no_remote"] = a.median / b.median  # a time: <= 1.2 is the goal


def _secret_vs_none(res: Results, server: _Server, repeat: int, progress: Progress,
                    total: int) -> None:
    """Values authenticated by a MAC (``remote_secret``) against CRC32C-checked ones: put
    (``remote_write="sync"``, until the server has them) and get (empty local tiers), the two
    interleaved in every repeat, the server emptied between them (outside timing)."""
    url = f"redis://127.0.0.1:{server.port}"
    for bs in (256 << 10, 2 << 20):
        n = max(1, total // bs)
        hs = list(range(1, n + 1))
        src = np.random.default_rng(bs + 1).integers(0, 256, n * bs, dtype=np.uint8)
        out = np.ones(n * bs, np.uint8)  # touched before timing
        cases = {}
        for label in ("mac", "crc"):
            for op in ("put-sync", "get"):
                cases[label, op] = res.case("remote", f"dynblock-{label}", op, block_size=bs)
        progress.add(2 * repeat)
        for _ in range(repeat):
            for label, secret in (("mac", "bench-secret"), ("crc", None)):
                with _manager(url, bs, n, remote_write="sync", remote_secret=secret) as m:
                    _, dt = timed_call(m.put, hs, src)
                    assert m.stats()["remote_stored"] == n, "remote put stored too few blocks"
                cases[label, "put-sync"].add_rate(n * bs, dt)
                with _manager(url, bs, n, remote_secret=secret) as m:
                    got, dt = timed_call(m.get, hs, out)
                assert got == n and np.array_equal(out, src), "remote get returned wrong bytes"
                cases[label, "get"].add_rate(n * bs, dt)
                server.flushall()
                progress.step(f"remote {label} {bs >> 10} KiB")
        for op in ("put-sync", "get"):
            mac, crc = cases["mac", op], cases["crc", op]
            mac.ratios["vs_no_secret"] = mac.median / crc.median
            if mac.cpu_s_per_gib is not None and crc.cpu_s_per_gib:
                mac.ratios["cpu_vs_no_secret"] = mac.cpu_s_per_gib / crc.cpu_s_per_gib


def _cluster_vs_one(res: Results, directory: str, one_url: str, servers: List[_Server],
                    repeat: int, progress: Progress) -> None:
    cli = shutil.which("redis-cli")
    if cli is None:
        res.note("remote: redis-cli is missing: no cluster case")
        return
    nodes = [_Server(os.path.join(directory, f"redis-c{i}"),
                     ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"])
             for i in range(3)]
    servers.extend(nodes)
    r = subprocess.run([cli, "--cluster", "create", *[f"127.0.0.1:{s.port}" for s in nodes],
                        "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True)
    if r.returncode != 0:
        res.note(f"remote: could not create a cluster: {r.stdout[-300:]}")
        return
    deadline = time.time() + 30
    # Every master learns the cluster's state by gossip on its own: wait for all of them.
    while not all("cluster_state:ok" in subprocess.run(
            [cli, "-p", str(n.port), "CLUSTER", "INFO"], capture_output=True, text=True,
            timeout=10).stdout for n in nodes):
        if time.time() > deadline:
            res.note("remote: the cluster never became ok")
            return
        time.sleep(0.2)
    cluster_url = "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in nodes)
    bs, per_thread, threads = 256 << 10, 64, 4
    for label, url in (("1-server", one_url), ("3-master-cluster", cluster_url)):
        hs_all = [list(range(t * 100_000 + 1, t * 100_000 + per_thread + 1)) for t in range(threads)]
        src = np.random.default_rng(3).integers(0, 256, per_thread * bs, dtype=np.uint8)
        for hs in hs_all:
            with _manager(url, bs, per_thread, remote_write="sync") as m:
                m.put(hs, src)
        c = res.case("remote", label, "get-4-threads", block_size=bs)
        for _ in range(repeat):
            mgrs = [_manager(url, bs, per_thread) for _ in range(threads)]
            outs = [np.ones(per_thread * bs, np.uint8) for _ in range(threads)]
            ths = [threading.Thread(target=m.get, args=(hs, o)) for m, hs, o in zip(mgrs, hs_all, outs)]
            def run_all(ths: List[threading.Thread] = ths) -> None:
                for t in ths:
                    t.start()
                for t in ths:
                    t.join()

            dt = timed(run_all)
            for m in mgrs:
                m.close()
            assert all(np.array_equal(o, src) for o in outs), "wrong bytes from the remote"
            c.add_rate(threads * per_thread * bs, dt)
        progress.step(f"remote {label} 4 threads")
    one = res.find("remote", "1-server", "get-4-threads", block_size=bs)
    clu = res.find("remote", "3-master-cluster", "get-4-threads", block_size=bs)
    if one is not None and clu is not None and one.values and clu.values:
        clu.ratios["vs_1_server"] = clu.median / one.median
