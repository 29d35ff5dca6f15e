"""The remote tier against real servers started here on loopback ports (no mocks), each test
against Redis and against Valkey: standalone, with an ACL user and password, with TLS (a CA
made in the test), and a 3-master cluster made with `redis-cli --cluster create` (or
valkey-cli's). Skips, saying why, without the server (`.ci/run` installs Debian's)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynblock import BlockManager, Config, RemoteError
from redis_servers import KINDS, Server, need

BS = 4096


@pytest.fixture(params=KINDS)
def redis(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    """A Redis server, then (a second run of the test) a Valkey server."""
    s = Server(tmp_path / "redis", [], kind=request.param)
    yield s
    s.stop()


def manager(url: str, host_blocks: int = 64, **kw) -> BlockManager:
    kw.setdefault("remote_timeout_ms", 500)
    return BlockManager(Config(block_size=BS, host_blocks=host_blocks, numa_node=None, pin=False,
                               remote=url, **kw))


def blocks(hs) -> np.ndarray:
    return np.concatenate([np.full(BS, h % 251, np.uint8) ^ np.arange(BS, dtype=np.uint8)
                           for h in hs]) if len(hs) else np.zeros(0, np.uint8)


# --- a second process ---------------------------------------------------------------------

_READER = textwrap.dedent("""
    import sys, json, numpy as np
    from dynblock import BlockManager, Config
    url, n, bs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    m = BlockManager(Config(block_size=bs, host_blocks=n, numa_node=None, pin=False, remote=url,
                            remote_timeout_ms=2000))
    assert len(m) == 0  # empty local tiers: whatever comes back comes from the remote
    out = np.zeros(n * bs, np.uint8)
    got = m.get(list(range(1000, 1000 + n)), out)
    s = m.stats()
    print(json.dumps({"got": got, "hits": s["remote_hits"], "local": len(m)}))
    np.save(sys.argv[4], out)
    m.close()
""")


def read_in_another_process(url: str, n: int, tmp_path: Path) -> "tuple[dict, np.ndarray]":
    import json

    out = tmp_path / "out.npy"
    r = subprocess.run([sys.executable, "-c", _READER, url, str(n), str(BS), str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), np.load(out)


def test_blocks_put_by_one_process_come_back_in_another(redis: Server, tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{redis.port}"
    hs = list(range(1000, 1040))
    with manager(url) as a:
        assert a.put(hs, blocks(hs)) == 40
        a.flush()  # the background writes are done
        s = a.stats()
        assert s["remote_stored"] == 40 and s["remote"]["url"] == url
    info, out = read_in_another_process(url, 40, tmp_path)
    assert info["got"] == 40 and info["hits"] == 40 and info["local"] == 40  # promoted locally
    assert np.array_equal(out, blocks(hs))


def test_background_writes_read_blocks_from_host_and_disk_and_skip_dropped_ones(
        redis: Server, tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{redis.port}"
    hs = list(range(1000, 1040))
    # 2 host slots: most blocks are on disk when the writer reads them back.
    with manager(url, host_blocks=2, disk_blocks=64, disk_dir=str(tmp_path)) as a:
        assert a.put(hs, blocks(hs)) == 40
        a.flush()
        assert a.stats()["remote_stored"] == 40
    info, out = read_in_another_process(url, 40, tmp_path)
    assert info["got"] == 40 and np.array_equal(out, blocks(hs))
    # Blocks gone from the local tiers before the writer reads them are
    # skipped, never sent with other bytes: a host-only tier of 2 slots, one
    # put of 40 (the writer starts after the put, when 38 are already gone).
    redis.cli("FLUSHALL")
    with manager(url, host_blocks=2) as b:
        b.put(hs, blocks(hs))
        b.flush()
        s = b.stats()
        assert s["remote_stored"] + s["remote_skipped"] == 40 and s["remote_skipped"] >= 38
        stored = int(redis.cli("DBSIZE"))
        assert stored == s["remote_stored"]
    sent = hs[len(hs) - stored:]  # the blocks still held when the writer ran: the last ones
    with manager(url, host_blocks=40) as c:
        out = np.zeros(len(sent) * BS, np.uint8)
        assert c.get(sent, out) == stored and np.array_equal(out, blocks(sent))


def test_background_writes_never_send_bytes_of_a_reused_slot(redis: Server) -> None:
    # A tiny host tier under two putting threads: slots are evicted and reused while the
    # writer reads blocks in place. Whatever reaches the server must be the block's own bytes
    # (a value's checksum is computed from what was read, so it cannot tell).
    url = f"redis://127.0.0.1:{redis.port}"
    n_threads, per_thread, batch = 2, 600, 4
    with manager(url, host_blocks=8) as m:
        def putter(t: int) -> None:
            for i in range(0, per_thread, batch):
                hs = [t * 100_000 + i + j for j in range(batch)]
                m.put(hs, blocks(hs))

        ths = [threading.Thread(target=putter, args=(t,)) for t in range(n_threads)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        m.flush()
        s = m.stats()
        assert s["remote_stored"] + s["remote_skipped"] == n_threads * per_thread
        assert s["remote_stored"] > 0
    keys = redis.cli("KEYS", "*").split()
    assert len(keys) == s["remote_stored"]
    sent = sorted(int(k.rsplit(":", 1)[1], 16) for k in keys)
    with manager(url, host_blocks=len(sent)) as fresh:
        out = np.zeros(len(sent) * BS, np.uint8)
        for i, h in enumerate(sent):
            assert fresh.get([h], out[i * BS:(i + 1) * BS]) == 1
        assert np.array_equal(out, blocks(sent))


def test_match_lookup_and_get_continue_past_the_local_tiers(redis: Server) -> None:
    url = f"redis://127.0.0.1:{redis.port}"
    hs = list(range(10))
    with manager(url) as a:
        a.put(hs, blocks(hs))
        a.flush()
    with manager(url, host_blocks=16) as b:
        b.put(hs[:3], blocks(hs[:3]))  # the local tiers hold a prefix
        assert b.match(hs + [99]) == 10  # local 3, then one round trip for the rest
        lease = b.lookup(hs)
        assert lease.count == 10  # fetched, kept locally, leased
        out = np.zeros(10 * BS, np.uint8)
        assert b.get(lease, out) == 10 and np.array_equal(out, blocks(hs))
        # a hole in the remote ends the prefix
        redis.cli("DEL", f"dynblock:{0:016x}:{BS}:{5:016x}")
        with manager(url, host_blocks=16) as c:
            out = np.zeros(10 * BS, np.uint8)
            assert c.get(hs, out) == 5 and np.array_equal(out[:5 * BS], blocks(hs[:5]))
            assert c.stats()["remote_misses"] == 1


def test_keys_carry_prefix_layout_and_block_size(redis: Server) -> None:
    url = f"redis://127.0.0.1:{redis.port}"
    with manager(url, remote_prefix="svcA") as a:
        a.put([7], blocks([7]))
        a.flush()
    assert redis.cli("EXISTS", f"svcA:{0:016x}:{BS}:{7:016x}") == "1"
    # another prefix, another block size: never the same keys
    with manager(url, remote_prefix="svcB") as b:
        assert b.match([7]) == 0
    with BlockManager(Config(block_size=2 * BS, host_blocks=4, numa_node=None, pin=False,
                             remote=url, remote_prefix="svcA")) as c:
        assert c.match([7]) == 0


def test_namespaces_reach_the_remote_tier_under_keys_of_their_own(redis: Server) -> None:
    """Blocks of the same hashes in the shared namespace and in "t1", and one in "t2" (sent
    with remote_write="sync"): each namespace's blocks come back in another manager with
    empty local tiers, under its own name only; the server's keys never show the names."""
    url = f"redis://127.0.0.1:{redis.port}"
    with manager(url) as a:
        assert a.put([1, 2], blocks([1, 2])) == 2
        assert a.put([1, 2], blocks([101, 102]), namespace="t1") == 2
        a.flush()
    with manager(url, remote_write="sync") as a:
        assert a.put([3], blocks([103]), namespace="t2") == 1
    keys = sorted(redis.cli("KEYS", "dynblock:*").split())
    assert len(keys) == 5 and not any("t1" in k or "t2" in k for k in keys), keys
    named = [k for k in keys if ":n" in k]
    assert len(named) == 3 and f"dynblock:{0:016x}:{BS}:{1:016x}" in keys
    with manager(url, host_blocks=16) as b:
        assert b.match([1, 2], namespace="t1") == 2 and b.match([3], namespace="t1") == 0
        assert b.match([3], namespace="t2") == 1 and b.match([1], namespace="t2") == 0
        assert b.match([1, 2], namespace="t3") == 0
        out = np.zeros(2 * BS, np.uint8)
        assert b.get([1, 2], out, namespace="t1") == 2 and np.array_equal(out, blocks([101, 102]))
        assert b.contains(1, namespace="t1") and 1 not in b  # kept locally, in "t1" only
        assert b.get([1, 2], out) == 2 and np.array_equal(out, blocks([1, 2]))
        with b.lookup([3], namespace="t2") as lease:
            assert lease.count == 1
            assert b.get(lease, out[:BS]) == 1 and np.array_equal(out[:BS], blocks([103]))
        assert b.stats(namespace="t2")["host_blocks_used"] == 1
        # remote hits per namespace: t1's two, t2's one; the shared namespace's two are the rest
        per = {ns: b.stats(namespace=ns)["remote_hits"] for ns in ("t1", "t2", "t3", None)}
        assert per == {"t1": 2, "t2": 1, "t3": 0, None: 2}, per
        assert b.stats()["remote_hits"] == 5
    # Another secret, other tags: another deployment's namespaces are not this one's.
    with manager(url, host_blocks=16, remote_secret="other") as c:
        assert c.match([1, 2], namespace="t1") == 0


def test_purge_with_remote_deletes_the_namespace_on_the_server_and_nothing_else(
        redis: Server) -> None:
    """purge(ns, remote=True) deletes the server's keys of that namespace only: not another
    namespace's, not the shared one's, not those of another prefix (whose glob characters
    must not widen the pattern) or block size; queued background writes of the namespace
    never land after it; a later get in another manager misses."""
    url = f"redis://127.0.0.1:{redis.port}"
    hs = list(range(1, 41))
    with manager(url, remote_write="sync") as a:
        assert a.put(hs, blocks(hs), namespace="t1") == 40
        assert a.put(hs[:2], blocks(hs[:2]), namespace="t2") == 2
        assert a.put(hs[:2], blocks(hs[:2])) == 2
    for prefix in ("p*", "pX"):  # "p*" unescaped would match "pX"'s keys too
        with manager(url, remote_write="sync", remote_prefix=prefix) as o:
            assert o.put([1], blocks([1]), namespace="t1") == 1
    with BlockManager(Config(block_size=2 * BS, host_blocks=4, numa_node=None, pin=False,
                             remote=url, remote_write="sync")) as o:
        assert o.put([1], np.zeros(2 * BS, np.uint8), namespace="t1") == 1
    before = set(redis.cli("KEYS", "*").split())
    assert len(before) == 40 + 2 + 2 + 2 + 1
    with manager(url) as b:
        out = np.zeros(40 * BS, np.uint8)
        assert b.get(hs[:3], out[:3 * BS], namespace="t1") == 3  # now held locally too
        assert b.purge("t1", remote=True) == 3
        assert b.stats()["remote_deleted"] == 40
        assert b.match(hs, namespace="t1") == 0  # neither tier has it
        assert b.purge("t1", remote=True) == 0 and b.stats()["remote_deleted"] == 40
        assert b.get(hs[:2], out[:2 * BS], namespace="t2") == 2
    after = set(redis.cli("KEYS", "*").split())
    gone = before - after
    assert after <= before and len(gone) == 40
    assert all(k.startswith(f"dynblock:{0:016x}:{BS}:n") for k in gone)
    assert sum(k.startswith("p*:") or k.startswith("pX:") for k in after) == 2
    with manager(url, host_blocks=64) as c:
        assert c.match(hs, namespace="t1") == 0
        assert c.match(hs[:2], namespace="t2") == 2 and c.match(hs[:2]) == 2
    # Background writes: what is queued for the namespace is dropped, what is being sent is
    # waited for, so nothing of it is left on the server after the purge.
    many = list(range(1000, 1512))
    with manager(url, host_blocks=512) as w:
        assert w.put(many, blocks(many), namespace="t3") == 512
        w.purge("t3", remote=True)
        w.flush()
        s = w.stats()
        assert s["remote_stored"] + s["remote_skipped"] == 512
    assert set(redis.cli("KEYS", "*").split()) == after
    # A prefix holding glob characters is matched literally: "p*" is not "pX".
    with manager(url, remote_prefix="p*") as p:
        p.purge("t1", remote=True)
        assert p.stats()["remote_deleted"] == 1
    left = set(redis.cli("KEYS", "*").split())
    assert after - left == {k for k in after if k.startswith("p*:")} and len(after - left) == 1


def test_remove_with_remote_deletes_those_blocks_on_the_server(redis: Server) -> None:
    url = f"redis://127.0.0.1:{redis.port}"
    hs = [1, 2, 3, 4, 5]
    with manager(url, remote_write="sync") as a:
        assert a.put(hs, blocks(hs), namespace="t1") == 5 and a.put(hs, blocks(hs)) == 5
    with manager(url) as b:
        assert b.get([1], np.zeros(BS, np.uint8), namespace="t1") == 1  # held locally too
        # 1 held here and on the server, 2 only on the server, 9 nowhere
        assert b.remove([1, 2, 9], namespace="t1", remote=True) == 1
        assert b.stats()["remote_deleted"] == 2
        assert b.match([1], namespace="t1") == 0 and b.match([2], namespace="t1") == 0
        # queued background writes of removed blocks never land after the removal
        many = list(range(1000, 1512))
        assert b.put(many, blocks(many)) == 512
        b.remove(many, remote=True)
        b.flush()
    keys = redis.cli("KEYS", "*").split()
    assert len(keys) == 3 + 5, keys  # t1's 3, 4, 5 and the shared namespace's five
    with manager(url) as c:
        assert c.match([3, 4, 5], namespace="t1") == 3 and c.match(hs) == 5
        assert c.match(many) == 0


def test_a_remote_purge_is_checked_and_bounded(tmp_path: Path) -> None:
    """Bad arguments change nothing; a server that never answers ends the purge at its
    timeout with RemoteError (the local tiers already purged); one that refuses SCAN is an
    error naming it and leaves the tier up."""
    from hostile_redis import HostileRedis

    srv = HostileRedis()
    try:
        url = f"redis://127.0.0.1:{srv.port}"
        with manager(url, remote_write="sync") as m:
            assert m.put([1, 2], blocks([1, 2]), namespace="t") == 2
            with pytest.raises(TypeError, match="remote must be a bool"):
                m.purge("t", remote="yes")  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="timeout must be"):
                m.remove([1], namespace="t", remote=True, timeout=0)
            for bad in (0, -1.0, float("nan"), True):
                with pytest.raises(ValueError, match="timeout must be"):
                    m.purge("t", remote=True, timeout=bad)
            assert m.match([1, 2], namespace="t") == 2 and len(srv.data) == 2
            with pytest.raises(RemoteError, match=r"refused SCAN.*unknown command"):
                m.purge("t", remote=True)
            # the local tiers forgot the blocks; the server (which refused) still has them
            assert not m.stats()["remote"]["down"] and len(srv.data) == 2
            assert not m.contains(1, namespace="t") and m.match([1], namespace="t") == 1
            with pytest.raises(RemoteError, match=r"refused UNLINK.*call remove again"):
                m.remove([1], namespace="t", remote=True)
            assert not m.stats()["remote"]["down"] and len(srv.data) == 2
            assert m.put([3], blocks([3]), namespace="t") == 1
            srv.mode = "stall"
            t = time.monotonic()
            with pytest.raises(RemoteError, match=r"after deleting 0 key\(s\): the timeout passed.*call purge again"):
                m.purge("t", remote=True, timeout=0.3)
            assert time.monotonic() - t < 2.0
            assert not m.contains(3, namespace="t")  # the local part is done
            assert m.put([4], blocks([4]), namespace="t") == 1  # its sync write times out
            t = time.monotonic()  # a removal is tried even while the tier is marked down
            with pytest.raises(RemoteError, match=r"the timeout passed.*call remove again"):
                m.remove([4], namespace="t", remote=True, timeout=0.3)
            assert time.monotonic() - t < 2.0 and not m.contains(4, namespace="t")
        with BlockManager(Config(block_size=BS, host_blocks=4, numa_node=None,
                                 pin=False)) as local:
            assert local.put([1], blocks([1]), namespace="t") == 1
            with pytest.raises(ValueError, match="needs a remote tier"):
                local.purge("t", remote=True)
            with pytest.raises(ValueError, match="needs a remote tier"):
                local.remove([1], namespace="t", remote=True)
            assert local.contains(1, namespace="t")
    finally:
        srv.close()


def test_a_corrupt_value_is_detected_counted_deleted_never_served(redis: Server,
                                                                  caplog) -> None:
    url = f"redis://127.0.0.1:{redis.port}"
    hs = [1, 2, 3]
    with manager(url) as a:
        a.put(hs, blocks(hs))
        a.flush()
    key = f"dynblock:{0:016x}:{BS}:{2:016x}"
    redis.cli("SET", key, "garbage")
    with caplog.at_level(logging.WARNING, logger="dynblock"):
        with manager(url) as b:
            out = np.zeros(3 * BS, np.uint8)
            assert b.get(hs, out) == 1  # block 2 is not served, nor anything after it
            assert np.array_equal(out[:BS], blocks([1]))
            assert b.stats()["remote_corrupt"] == 1
    assert redis.cli("EXISTS", key) == "0"  # deleted
    assert any("failed verification" in r.getMessage() for r in caplog.records)
    # a value of the right size with one flipped byte fails its checksum too
    with manager(url) as a:
        a.put([2], blocks([2]))
        a.flush()
    raw = subprocess.run([need("redis-cli"), "-p", str(redis.port), "--no-raw", "GETRANGE", key,
                          "40", "40"], capture_output=True, text=True).stdout
    assert raw  # the value exists again
    redis.cli("SETRANGE", key, "40", "\x01" if raw.strip() != '"\\x01"' else "\x02")
    with manager(url) as b:
        assert b.get([2], np.zeros(BS, np.uint8)) == 0
        assert b.stats()["remote_corrupt"] == 1


def test_remote_write_modes(redis: Server) -> None:
    url = f"redis://127.0.0.1:{redis.port}"
    with manager(url, remote_write="sync") as a:
        a.put([1, 2], blocks([1, 2]))
        assert redis.cli("DBSIZE") == "2"  # written before put returned
        a.put([1, 3], blocks([1, 3]))  # only the new block goes out
        assert a.stats()["remote_stored"] == 3
    with manager(url, remote_write="off") as b:
        b.put([9], blocks([9]))
        b.flush()
        assert redis.cli("DBSIZE") == "3" and b.match([1, 2, 3]) == 3  # still reads
    with manager(url, remote_ttl_s=100, remote_write="sync") as c:
        c.put([20], blocks([20]))
    ttl = int(redis.cli("TTL", f"dynblock:{0:016x}:{BS}:{20:016x}"))
    assert 0 < ttl <= 100


@pytest.mark.parametrize("kind", KINDS)
def test_a_killed_server_costs_hits_never_liveness_and_the_tier_comes_back(
        tmp_path: Path, caplog, kind: str) -> None:
    srv = Server(tmp_path / "r", [], kind=kind)
    url = f"redis://127.0.0.1:{srv.port}"
    try:
        with caplog.at_level(logging.WARNING, logger="dynblock"):
            m = manager(url, host_blocks=8192, remote_write="sync", remote_timeout_ms=300)
            hs = list(range(8000))  # 32 MiB in 125 pipelined round trips: the kill lands mid-batch
            done = threading.Event()
            result: Dict[str, int] = {}

            def big_put() -> None:
                result["n"] = m.put(hs, blocks(hs))
                done.set()

            th = threading.Thread(target=big_put)
            th.start()
            while srv.cli("DBSIZE") == "0" and not done.is_set():
                pass  # until the first of the batch's 125 round trips landed
            srv.kill()  # SIGKILL in the middle of the batch
            assert done.wait(30), "put did not return after the server died"
            th.join()
            assert result["n"] == 8000  # the local tiers took every block
            out = np.zeros(8000 * BS, np.uint8)
            assert m.get(hs, out) == 8000 and np.array_equal(out, blocks(hs))
            s = m.stats()
            # what went out before the kill, and what was skipped after it, make the batch
            assert s["remote_stored"] + s["remote_skipped"] == 8000 and s["remote_skipped"] > 0
            assert m.match([50000]) == 0  # a miss costs no hang
            m.put([50001], blocks([50001]))  # nor does a put
            s = m.stats()
            assert s["remote_errors"] >= 1 and s["remote"]["down"]
            # the server comes back on the same port: the tier reconnects by itself
            srv.start()
            deadline = time.time() + 30
            fresh = 200_000
            while time.time() < deadline:
                fresh += 1
                m.put([fresh], blocks([fresh]))  # a block new to the local tiers goes out
                if not m.stats()["remote"]["down"] and int(srv.cli("DBSIZE")) > 0:
                    break
                time.sleep(0.2)
            assert not m.stats()["remote"]["down"] and int(srv.cli("DBSIZE")) > 0
            m.close()
        msgs = [r.getMessage() for r in caplog.records if "remote tier" in r.getMessage()]
        assert sum("unavailable" in x for x in msgs) == 1  # one line per change, not per call
        assert sum("reachable again" in x for x in msgs) == 1
    finally:
        srv.stop()


def used_memory(srv: Server) -> int:
    info = srv.cli("INFO", "memory").splitlines()
    return int(next(ln.split(":")[1] for ln in info if ln.startswith("used_memory:")))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("write", ["async", "sync"])
def test_a_full_server_refusing_writes_keeps_reads_and_comes_back(tmp_path: Path, caplog,
                                                                  kind: str, write: str) -> None:
    # maxmemory with noeviction: once full, every SET is answered with an OOM error.
    srv = Server(tmp_path / "full", ["--maxmemory-policy", "noeviction"], kind=kind)
    srv.cli("CONFIG", "SET", "maxmemory", str(used_memory(srv) + (2 << 20)))  # room for ~2 MiB
    url = f"redis://127.0.0.1:{srv.port}"
    bs = 64 << 10
    try:
        with caplog.at_level(logging.WARNING, logger="dynblock"):
            m = BlockManager(Config(block_size=bs, host_blocks=512, numa_node=None, pin=False,
                                    remote=url, remote_write=write))
            data = lambda hs: np.concatenate([np.full(bs, h % 251, np.uint8) for h in hs])  # noqa: E731
            for k in range(12):  # 12 x 8 blocks of 64 KiB: 6 MiB into room for 2 MiB
                hs = list(range(k * 8, k * 8 + 8))
                assert m.put(hs, data(hs)) == 8  # the local tiers take every block
                m.flush()
            s = m.stats()
            stored = s["remote_stored"]
            assert 0 < stored < 96 and stored + s["remote_skipped"] == 96
            assert stored == int(srv.cli("DBSIZE"))  # counted exactly: what the server took
            assert s["remote"]["refusing_writes"] and not s["remote"]["down"]
            assert s["remote_errors"] >= 1
            # reads go on: a fresh process gets what the server holds
            with BlockManager(Config(block_size=bs, host_blocks=512, numa_node=None, pin=False,
                                     remote=url)) as b:
                out = np.zeros(96 * bs, np.uint8)
                assert b.match(list(range(96))) == stored
                assert b.get(list(range(96)), out) == stored
                assert np.array_equal(out[:stored * bs], data(range(stored)))
            # room again: after the backoff (250 ms at first) new blocks go out again
            srv.cli("CONFIG", "SET", "maxmemory", "0")
            deadline = time.time() + 30
            fresh = 1000
            while m.stats()["remote"]["refusing_writes"] and time.time() < deadline:
                time.sleep(0.1)
                fresh += 1
                m.put([fresh], data([fresh]))
                m.flush()
            assert not m.stats()["remote"]["refusing_writes"]
            assert m.stats()["remote_stored"] > stored
            m.close()
        msgs = [r.getMessage() for r in caplog.records if "remote tier" in r.getMessage()]
        assert sum("refuses writes" in x and "OOM" in x for x in msgs) == 1, msgs
        assert sum("accepts writes again" in x for x in msgs) == 1, msgs
        assert not any("unavailable" in x for x in msgs), msgs
    finally:
        srv.stop()


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_password_and_bad_urls_fail_at_open_without_the_password(tmp_path: Path,
                                                                        caplog, kind: str) -> None:
    conf = tmp_path / "acl.conf"
    conf.write_text("user default off\nuser alice on >s3cret-pw ~* &* +@all\n")
    srv = Server(tmp_path / "acl", ["--aclfile", str(conf)], kind=kind)
    try:
        good = f"redis://alice:s3cret-pw@127.0.0.1:{srv.port}"
        with caplog.at_level(logging.DEBUG, logger="dynblock"):
            with manager(good) as m:
                m.put([1], blocks([1]))
                m.flush()
                s = m.stats()
                assert "s3cret-pw" not in repr(s) and s["remote"]["url"].endswith(
                    f"alice:***@127.0.0.1:{srv.port}")
                assert "s3cret-pw" not in repr(m.config) and "s3cret-pw" not in repr(m)
        assert srv.cli("DBSIZE", user="alice", password="s3cret-pw") == "1"
        with pytest.raises(RemoteError) as e:
            manager(f"redis://alice:wrong-pw@127.0.0.1:{srv.port}")
        msg = str(e.value)
        assert "wrong-pw" not in msg and f"alice:***@127.0.0.1:{srv.port}" in msg
        with pytest.raises(RemoteError):
            manager(f"redis://127.0.0.1:{srv.port}")  # no credentials: default user is off
        assert not any("s3cret-pw" in r.getMessage() or "wrong-pw" in r.getMessage()
                       for r in caplog.records)
    finally:
        srv.stop()
    with pytest.raises(ValueError, match=r"remote must be a redis://.*got 'http://u:\*\*\*@h:1'"):
        Config(block_size=BS, host_blocks=1, remote="http://u:pw@h:1")
    with pytest.raises(RemoteError, match="127.0.0.1:1"):
        manager("redis://127.0.0.1:1")  # nothing listens there
    with pytest.raises(ValueError, match="remote_write"):
        Config(block_size=BS, host_blocks=1, remote="redis://h:1", remote_write="later")


def _make_ca(d: Path) -> "tuple[Path, Path, Path, Path]":
    need("openssl")
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, crt = (d / n for n in ("ca.key", "ca.crt", "srv.key", "srv.csr", "srv.crt"))

    def run(*a: str) -> None:
        r = subprocess.run(["openssl", *a], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
        "-days", "2", "-subj", "/CN=dynblock test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", "/CN=localhost")
    ext = d / "ext.cnf"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(crt), "-days", "2", "-extfile", str(ext))
    other = d / "other"
    other.mkdir()
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(other / "k"),
        "-out", str(other / "ca.crt"), "-days", "2", "-subj", "/CN=another CA")
    return ca, crt, key, other / "ca.crt"


@pytest.mark.parametrize("kind", KINDS)
def test_tls_with_a_ca_file_and_a_wrong_ca(tmp_path: Path, kind: str) -> None:
    ca, crt, key, wrong_ca = _make_ca(tmp_path / "pki")
    srv = Server(tmp_path / "tls", ["--tls-cert-file", str(crt), "--tls-key-file", str(key),
                                    "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"],
                 tls=True, kind=kind)
    try:
        url = f"rediss://127.0.0.1:{srv.port}"
        hs = list(range(8))
        with manager(url, remote_ca_file=str(ca)) as a:
            a.put(hs, blocks(hs))
            a.flush()
            assert a.stats()["remote_stored"] == 8
        with manager(url, remote_ca_file=str(ca)) as b:
            out = np.zeros(8 * BS, np.uint8)
            assert b.get(hs, out) == 8 and np.array_equal(out, blocks(hs))
        with pytest.raises(RemoteError, match=f"rediss://127.0.0.1:{srv.port}"):
            manager(url, remote_ca_file=str(wrong_ca))  # certificate not trusted
        with pytest.raises(RemoteError):
            manager(url)  # the system roots do not know the test CA either
        with pytest.raises(ValueError, match="not a TLS URL"):
            manager(f"redis://127.0.0.1:{srv.port}", remote_ca_file=str(ca))
    finally:
        srv.stop()


@pytest.fixture(params=KINDS)
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[List[Server]]:
    kind = request.param
    cli = need(f"{kind}-cli")
    nodes = [Server(tmp_path / f"c{i}", ["--cluster-enabled", "yes", "--cluster-config-file",
                                         "nodes.conf", "--cluster-node-timeout", "2000"], kind=kind)
             for i in range(3)]
    try:
        r = subprocess.run([cli, "--cluster", "create",
                            *[f"127.0.0.1:{n.port}" for n in nodes], "--cluster-replicas", "0",
                            "--cluster-yes"], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            pytest.skip(f"{kind}-cli --cluster create failed here: {r.stdout[-500:]} {r.stderr[-500:]}")
        # Each master learns the cluster's state by gossip on its own: until every one says
        # ok, a write routed to a late one is refused with CLUSTERDOWN (seen once in a full run
        # when only the first master was asked).
        deadline = time.time() + 30
        while not all("cluster_state:ok" in n.cli("CLUSTER", "INFO") for n in nodes):
            assert time.time() < deadline, "the cluster never became ok on every master"
            time.sleep(0.2)
        yield nodes
    finally:
        for n in nodes:
            n.stop()


@pytest.mark.parametrize("secret", [None, "side-secret"])
def test_check_threads_make_and_accept_the_same_values_as_inline_checks(
        cluster: List[Server], secret: "str | None") -> None:
    # Side threads compute a sync put's headers (CRC or MAC) while the commands go out, and check
    # a get's values while the next ones land. On a cluster the commands leave grouped by master,
    # not in the order the side threads work in. Values written either way are read back either
    # way, and one whose block was changed on the server is refused by both.
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in cluster)
    hs = list(range(2000, 2150))
    half = len(hs) // 2
    for w, r in ((3, 0), (0, 3), (3, 3)):
        prefix = f"t{w}{r}"
        with manager(url, host_blocks=256, remote_secret=secret, remote_write="sync",
                     remote_prefix=prefix, remote_timeout_ms=5000, remote_check_threads=w) as a:
            assert a.put(hs[:half], blocks(hs[:half])) == half
            assert a.put(hs[half:], blocks(hs[half:])) == len(hs) - half
            assert a.stats()["remote_stored"] == len(hs)
        with manager(url, host_blocks=256, remote_secret=secret, remote_prefix=prefix,
                     remote_timeout_ms=5000, remote_check_threads=r) as b:
            out = np.zeros(len(hs) * BS, np.uint8)
            assert b.get(hs, out) == len(hs) and np.array_equal(out, blocks(hs))
    # A changed byte in the block of the 71st value: 70 come back, each intact.
    key = f"t33:{0:016x}:{BS}:{hs[70]:016x}"
    header = 32 if secret is None else 64
    for n in cluster:
        if n.cli("EXISTS", key) == "1":
            n.cli("SETRANGE", key, str(header + BS // 2), "?")
    with manager(url, host_blocks=256, remote_secret=secret, remote_prefix="t33",
                 remote_timeout_ms=5000, remote_check_threads=3) as b:
        out = np.zeros(len(hs) * BS, np.uint8)
        assert b.get(hs, out) == 70 and np.array_equal(out[:70 * BS], blocks(hs[:70]))
        s = b.stats()
        assert s["remote_corrupt" if secret is None else "remote_unauthenticated"] == 1


def test_check_threads_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="remote_check_threads .* between 0 and 64"):
        Config(block_size=BS, host_blocks=4, remote="redis://h:1", remote_check_threads=65)
    assert Config.from_env({"DYNBLOCK_REMOTE_CHECK_THREADS": "2", "DYNBLOCK_REMOTE_URL": "redis://h:1"},
                           block_size=BS, host_blocks=4).remote_check_threads == 2


def test_cluster_spreads_keys_over_every_master_and_serves_another_process(
        cluster: List[Server], tmp_path: Path) -> None:
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in cluster[:2])
    hs = list(range(1000, 1060))
    with manager(url, remote_timeout_ms=2000) as a:
        assert a.stats()["remote"]["cluster"]
        a.put(hs, blocks(hs))
        a.flush()
        assert a.stats()["remote_stored"] == 60
    sizes = [int(n.cli("DBSIZE")) for n in cluster]
    assert sum(sizes) == 60 and all(s > 0 for s in sizes), sizes
    info, out = read_in_another_process(url, 60, tmp_path)
    assert info["got"] == 60 and np.array_equal(out, blocks(hs))


def test_purge_with_remote_scans_every_master_of_a_cluster(cluster: List[Server]) -> None:
    # 4000 keys of "t1" over three masters: several SCAN steps on each (a step looks at about
    # 1000 of a master's keys); the shared namespace's 100 keys stay.
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in cluster)
    hs = list(range(5000, 9000))
    with manager(url, host_blocks=4100, remote_write="sync", remote_timeout_ms=5000) as a:
        for i in range(0, len(hs), 500):
            assert a.put(hs[i:i + 500], blocks(hs[i:i + 500]), namespace="t1") == 500
        assert a.put(hs[:100], blocks(hs[:100])) == 100
        assert a.stats()["remote_stored"] == 4100
        assert min(int(n.cli("DBSIZE")) for n in cluster) > 1000
        assert a.purge("t1", remote=True) == 4000
        assert a.stats()["remote_deleted"] == 4000
        # remove: each block's UNLINK goes to the master that holds it
        assert a.remove(hs[:50], remote=True) == 50
        assert a.stats()["remote_deleted"] == 4050
    keys = [k for n in cluster for k in n.cli("KEYS", "*").split()]
    assert len(keys) == 50 and not any(":n" in k for k in keys)
    assert {int(k.rsplit(":", 1)[1], 16) for k in keys} == set(hs[50:100])


def test_a_full_cluster_refusing_writes_is_not_down(cluster: List[Server]) -> None:
    for n in cluster:  # room for about 1.5 MiB of values on each master
        n.cli("CONFIG", "SET", "maxmemory-policy", "noeviction")
        n.cli("CONFIG", "SET", "maxmemory", str(used_memory(n) + (3 << 19)))
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in cluster)
    bs = 64 << 10
    hs = list(range(300))  # 19 MiB into 3 x 1.5 MiB
    src = np.concatenate([np.full(bs, h % 251, np.uint8) for h in hs])
    with BlockManager(Config(block_size=bs, host_blocks=512, numa_node=None, pin=False, remote=url,
                             remote_write="sync", remote_timeout_ms=2000)) as m:
        for i in range(0, 300, 20):
            assert m.put(hs[i:i + 20], src[i * bs:(i + 20) * bs]) == 20
        s = m.stats()
        assert s["remote"]["refusing_writes"] and not s["remote"]["down"]
        keys = [k for n in cluster for k in n.cli("KEYS", "*").split()]
        held = {int(k.rsplit(":", 1)[1], 16) for k in keys}
        # counted exactly: the refusal lists the commands the masters refused
        assert 0 < s["remote_stored"] == len(held) < 300
        assert s["remote_stored"] + s["remote_skipped"] == 300
    # reads go on: a fresh process gets the prefix the cluster holds
    k = 0
    while k < len(hs) and hs[k] in held:
        k += 1
    with BlockManager(Config(block_size=bs, host_blocks=512, numa_node=None, pin=False, remote=url,
                             remote_timeout_ms=2000)) as b:
        assert b.match(hs) == k
        out = np.zeros(300 * bs, np.uint8)
        assert b.get(hs, out) == k and np.array_equal(out[:k * bs], src[:k * bs])


# --- the block-manager model with a remote that may lose entries -------------------------

@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("redis-model"), [])
    yield s
    s.stop()


ops = st.lists(st.tuples(st.sampled_from(["put", "get", "match", "lose", "new_process"]),
                         st.lists(st.integers(0, 11), min_size=1, max_size=6)),
               min_size=1, max_size=12)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(ops=ops)
def test_model_remote_as_an_unbounded_tier_that_loses_entries(shared_redis: Server, ops) -> None:
    # Model: the remote holds every block ever put (sync) unless lost; a manager's answer to
    # get/match is its local prefix continued by the remote's. Served bytes are always right,
    # and never less than the local prefix.
    shared_redis.cli("FLUSHALL")
    url = f"redis://127.0.0.1:{shared_redis.port}"
    remote: set = set()
    m = manager(url, host_blocks=3, remote_write="sync")
    try:
        for op, hs in ops:
            if op == "put":
                before = {h for h in hs if h in m}
                m.put(hs, blocks(hs))
                remote |= set(hs) - before  # only blocks new to this manager go out
            elif op == "lose":
                for h in hs:
                    shared_redis.cli("DEL", f"dynblock:{0:016x}:{BS}:{h:016x}")
                remote -= set(hs)
            elif op == "new_process":
                m.close()
                m = manager(url, host_blocks=3, remote_write="sync")
            else:
                # the local prefix, then the remote's continuation of it
                k = 0
                while k < len(hs) and hs[k] in m:
                    k += 1
                while k < len(hs) and hs[k] in remote:
                    k += 1
                if op == "match":
                    assert m.match(hs) == k
                else:
                    out = np.zeros(len(hs) * BS, np.uint8)
                    n = m.get(hs, out)
                    assert n == k, (hs, sorted(remote))
                    assert np.array_equal(out[:n * BS], blocks(hs[:n]))
    finally:
        m.close()


def test_the_readme_remote_example_runs(redis: Server) -> None:
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "remote=" in b]
    code = re.sub(r"redis://[^\"]+", f"redis://127.0.0.1:{redis.port}/0", code)
    code = code.replace("host_blocks=1024", "host_blocks=4")
    ns: dict = {"BlockManager": BlockManager, "Config": Config}
    exec(compile(code, "README.md", "exec"), ns)
    kv = ns["kv"]
    assert kv.stats()["remote"]["url"] == f"redis://127.0.0.1:{redis.port}/0"
    kv.close()


def test_a_lookup_fetches_a_long_remote_prefix_in_bounded_pieces(redis: Server) -> None:
    url = f"redis://127.0.0.1:{redis.port}"
    hs = list(range(5000, 5150))  # more than one 64-block piece
    with manager(url, host_blocks=256) as a:
        a.put(hs, blocks(hs))
        a.flush()
    with manager(url, host_blocks=256) as b:
        lease = b.lookup(hs)
        assert lease.count == 150 and len(b) == 150
        out = np.zeros(150 * BS, np.uint8)
        assert b.get(lease, out) == 150 and np.array_equal(out, blocks(hs))
        redis.cli("DEL", f"dynblock:{0:016x}:{BS}:{5100:016x}")
    with manager(url, host_blocks=256) as c:  # a hole in the second piece ends the prefix there
        assert c.lookup(hs).count == 100
