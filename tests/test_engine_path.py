"""The engine path: whatever a Redis server, a link, a local peer or a callback does, the
engine's calls into the store return in bounded time and memory, leases are never left
orphaned, tenants cannot serve each other's blocks, and errors cross processes. Hostile
servers are tests/hostile_redis.py; real Redis/Valkey servers come from redis_servers.py."""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Iterator, List

import numpy as np
import pytest

import dynblock
from dynblock import BlockManager, Config, EnvError
from conftest import run_py
from hostile_redis import HostileRedis
from redis_servers import KINDS, Server
from test_durability import flip, open_store

BS = 4096


def data_for(h: int) -> np.ndarray:
    return np.random.default_rng(h).integers(0, 256, size=BS, dtype=np.uint8)


def blocks(hs: List[int]) -> np.ndarray:
    return np.concatenate([data_for(h) for h in hs])


def manager(url: str, **kw) -> BlockManager:
    kw.setdefault("host_blocks", 64)
    return BlockManager(Config(block_size=BS, numa_node=None, pin=False, remote=url, **kw))


@pytest.fixture
def hostile() -> Iterator[HostileRedis]:
    srv = HostileRedis()
    yield srv
    srv.close()


def timed(fn, *args) -> "tuple[object, float]":
    t = time.monotonic()
    r = fn(*args)
    return r, time.monotonic() - t


# ---- the remote tier: deadlines, reply sizes, redirects ------------------------------------
def test_every_remote_call_ends_by_its_deadline_against_a_trickling_server(
        hostile: HostileRedis) -> None:
    url = f"redis://127.0.0.1:{hostile.port}"
    with manager(url, remote_write="sync", remote_timeout_ms=200) as w:
        assert w.put([1, 2, 3, 4], blocks([1, 2, 3, 4])) == 4
    with manager(url, remote_timeout_ms=200) as kv:
        hostile.mode = "trickle"  # a reply takes ~4096 x 50 ms: 200 s
        out = np.zeros(4 * BS, np.uint8)
        calls = [lambda: kv.get([1, 2, 3, 4], out), lambda: kv.lookup([1, 2, 3, 4]).count,
                 lambda: kv.match(list(range(1, 65))), lambda: kv.put([9], data_for(9))]
        for call in calls:
            time.sleep(0.3)  # past the backoff: each call reaches the server
            n, took = timed(call)
            # Liveness, not speed: the server would hold the call for minutes.
            assert took < 2.0, (call, took)
        s = kv.stats()
        assert s["remote_deadline_missed"] >= 2 and s["remote_hits"] == 0
        time.sleep(0.3)
        kv.put(list(range(100, 164)), np.zeros(64 * BS, np.uint8))  # queued for the writer
        _, took = timed(kv.flush)  # the writer's batch ends at its deadline, the rest is skipped
        assert took < 2.0
        kv.put(list(range(200, 264)), np.zeros(64 * BS, np.uint8))
        _, took = timed(kv.close)
        assert took < 2.0
    hostile.mode = "stall"
    with pytest.raises(dynblock.RemoteError):
        timed(manager, url)  # the PING at open is cut too


def test_a_value_announced_as_6_gib_costs_one_block_of_memory(hostile: HostileRedis,
                                                              tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import resource, numpy as np, dynblock
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        kv = dynblock.BlockManager(dynblock.Config(block_size={BS}, host_blocks=8, numa_node=None,
            pin=False, remote="redis://127.0.0.1:{hostile.port}", remote_timeout_ms=5000))
        n = kv.get([1], np.zeros({BS}, np.uint8))
        s = kv.stats()
        print(n, s["remote_oversized"], s["remote"]["down"])
    """)
    hostile.mode = "huge"
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["0", "1", "False"], r.stdout


@pytest.mark.parametrize("bs", [BS, 100 << 10])
@pytest.mark.parametrize("secret", [None, "fragment-secret"])
@pytest.mark.parametrize("check_threads", [0, 2])
def test_values_arriving_in_odd_pieces_land_whole_and_every_byte_is_checked(
        hostile: HostileRedis, bs: int, secret: "str | None", check_threads: int) -> None:
    # A value is read straight into its destination and checked piece by piece as it lands
    # (check_threads=0), or whole on a side thread while the next one lands: pieces of any size
    # (a length line split in two, a header across reads, 100 KiB blocks that straddle the
    # MAC's 16 KiB runs) give the same bytes, and a changed byte anywhere in the block, the
    # first or the last, is caught.
    cfg = dict(block_size=bs, host_blocks=8, numa_node=None, pin=False,
               remote=f"redis://127.0.0.1:{hostile.port}", remote_timeout_ms=20000,
               remote_secret=secret, remote_check_threads=check_threads)
    data = np.random.default_rng(bs).integers(0, 256, 3 * bs, dtype=np.uint8)
    with BlockManager(Config(remote_write="sync", **cfg)) as w:
        assert w.put([1, 2, 3], data) == 3
    hostile.mode = "fragment"
    out = np.zeros(3 * bs, np.uint8)
    with BlockManager(Config(**cfg)) as r:
        assert r.get([1, 2, 3], out) == 3 and np.array_equal(out, data)
        assert r.stats()["remote_hits"] == 3
    header = 32 if secret is None else 64
    bad = "remote_corrupt" if secret is None else "remote_unauthenticated"
    for h, at in ((1, header), (2, header + bs - 1)):
        hostile.flip = at
        with BlockManager(Config(**cfg)) as r:
            assert r.get([h], out[:bs]) == 0
            assert r.stats()[bad] == 1 and r.stats()["remote_hits"] == 0
    hostile.flip = None
    with BlockManager(Config(**cfg)) as r:
        # A corrupt value was deleted (a CRC's); one failing its MAC was kept; 3 is intact.
        assert r.get([3], out[:bs]) == 1 and np.array_equal(out[:bs], data[2 * bs:])
        assert r.get([1], out[:bs]) == (0 if secret is None else 1)


def test_a_cluster_that_moves_keys_forever_costs_hits_not_time(hostile: HostileRedis) -> None:
    url = f"redis+cluster://127.0.0.1:{hostile.port}"
    with manager(url, remote_write="sync", remote_timeout_ms=300) as kv:
        assert kv.put([1], data_for(1)) == 1
        hostile.mode = "moved"
        kv.remove([1])
        out = np.zeros(BS, np.uint8)
        for call in (lambda: kv.get([1], out), lambda: kv.match([1]),
                     lambda: kv.put([2], data_for(2))):
            n, took = timed(call)
            assert took < 2.0
        assert kv.get([1], out) == 0 and kv.match([1]) == 0


# ---- tenants: a MAC with a secret, ACL users -------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_values_without_a_valid_mac_are_never_served(tmp_path: Path, kind: str, caplog) -> None:
    srv = Server(tmp_path / kind, [], kind=kind)
    url = f"redis://127.0.0.1:{srv.port}"
    try:
        secret = "tenant-b-secret-7f3a"
        with manager(url, remote_prefix="tenantB", remote_secret=secret,
                     remote_write="sync") as victim:
            assert victim.put([1, 2], blocks([1, 2])) == 2
            assert secret not in repr(victim.config) and secret not in repr(victim)
            assert secret not in repr(victim.stats()) and victim.stats()["remote"]["authenticated"]
        # Another client of the server, without the secret, plants a block under the prefix.
        with manager(url, remote_prefix="tenantB", remote_write="sync") as other:
            assert other.put([7], np.frombuffer(b"EVIL!!!!" * 512, np.uint8)) == 1
            assert other.match([1, 2]) == 2  # it can see keys (ACLs hide them: see below) ...
            assert other.get([1, 2], np.zeros(2 * BS, np.uint8)) == 0  # ... but not use them
        with caplog.at_level(logging.WARNING, logger="dynblock"):
            with manager(url, remote_prefix="tenantB", remote_secret=secret) as victim:
                out = np.zeros(2 * BS, np.uint8)
                assert victim.get([7], out[:BS]) == 0  # planted: a miss, counted
                assert victim.get([1, 2], out) == 2 and np.array_equal(out, blocks([1, 2]))
                assert victim.stats()["remote_unauthenticated"] == 1
            with manager(url, remote_prefix="tenantB", remote_secret="another") as wrong:
                assert wrong.get([1], out[:BS]) == 0
        assert any("no valid MAC" in r.getMessage() for r in caplog.records)
        assert not any(secret in r.getMessage() for r in caplog.records)
        # The value was kept (only its writer's key can judge it), the planted one too.
        assert srv.cli("DBSIZE") == "3"
        with pytest.raises(EnvError, match="DYNBLOCK_REMOTE_SECRET") as e:
            Config.from_env({"DYNBLOCK_REMOTE_SECRET": secret}, block_size=BS, host_blocks=4)
        assert secret not in str(e.value)
    finally:
        srv.stop()


@pytest.mark.parametrize("kind", KINDS)
def test_acl_users_keep_tenants_apart(tmp_path: Path, kind: str, caplog) -> None:
    conf = tmp_path / "users.acl"
    # The recipe of the README: one user per tenant, its own key prefix, the commands the tier uses.
    conf.write_text("user default off\n"
                    "user tenant-a on >pa-secret ~tenantA:* +get +set +exists +del +ping\n"
                    "user tenant-b on >pb-secret ~tenantB:* +get +set +exists +del +ping\n"
                    "user admin on >admin-pw ~* +@all\n")
    srv = Server(tmp_path / kind, ["--aclfile", str(conf)], kind=kind)
    a_url = f"redis://tenant-a:pa-secret@127.0.0.1:{srv.port}"
    b_url = f"redis://tenant-b:pb-secret@127.0.0.1:{srv.port}"
    try:
        with manager(b_url, remote_prefix="tenantB", remote_write="sync") as b:
            assert b.put([1, 2], blocks([1, 2])) == 2
        with caplog.at_level(logging.WARNING, logger="dynblock"):
            # Tenant A's user naming B's prefix: can neither read, probe nor write it.
            with manager(a_url, remote_prefix="tenantB", remote_write="sync") as a:
                out = np.zeros(2 * BS, np.uint8)
                assert a.match([1, 2]) == 0 and a.get([1, 2], out) == 0
                assert a.lookup([1, 2]).count == 0
                assert a.put([3], data_for(3)) == 1  # stored locally; the server refused it
                s = a.stats()
                assert s["remote_stored"] == 0 and s["remote"]["refusing_writes"]
                assert not s["remote"]["down"]
        msgs = [r.getMessage() for r in caplog.records]
        assert any("refuses writes (NOPERM" in m for m in msgs), msgs
        assert srv.cli("DBSIZE", user="admin", password="admin-pw") == "2"
        with manager(b_url, remote_prefix="tenantB") as b:
            out = np.zeros(2 * BS, np.uint8)
            assert b.get([1, 2], out) == 2 and np.array_equal(out, blocks([1, 2]))
    finally:
        srv.stop()


# ---- the lookup service -----------------------------------------------------------------------
def _layer_store(**kw):
    from dynblock.vllm.store import LayerStore

    layout = LayerStore.layout_for(2, 16, [2, 16, 32], "float32")
    return LayerStore(Config(layout=layout, host_blocks=8, numa_node=None, pin=False, **kw))


def _save(store, hashes: List[bytes]) -> None:
    rows = np.random.default_rng(0).integers(0, 255, (len(hashes), store.kv.block_size),
                                             dtype=np.uint8)
    for layer in range(store.num_layers):
        store.save(layer, hashes, rows, list(range(len(hashes))), True).wait()


def test_a_lookup_the_scheduler_gave_up_on_leaves_no_lease(tmp_path: Path,
                                                           hostile: HostileRedis) -> None:
    from dynblock.vllm.service import LookupClient, LookupServer

    # The review's case: the remote part of every lookup would wait 500 ms for a stalled
    # server; the scheduler waits 50 ms. The worker keeps to the budget it was sent.
    store = _layer_store(remote=f"redis://127.0.0.1:{hostile.port}", remote_write="off",
                         remote_timeout_ms=500)
    hashes = [bytes([i]) * 32 for i in range(1, 9)]
    _save(store, hashes[:4])
    hostile.mode = "stall"
    released: List[str] = []

    def release(rid: str) -> bool:
        released.append(rid)
        return store.release(rid)

    def slow_lookup(rid: str, hs: list, timeout: "float | None" = None) -> int:
        n = store.lookup(rid, hs, timeout=timeout)
        if rid.startswith("late"):
            time.sleep(0.15)  # a worker busy elsewhere: the answer comes after the budget
        return n

    server = LookupServer(str(tmp_path / "lookup.sock"), slow_lookup, release)
    client = LookupClient(server.path, timeout=0.05, retry_s=0.0)  # reconnect at once
    try:
        got, took = timed(client.lookup, "req-1", hashes)
        assert took < 1.0 and got in (0, 4)  # 4 local blocks, the remote part cut at the budget
        if got:
            client.release("req-1")  # what the connector does with a lease it will not load
        # A lookup that ends after the budget: no hit, and the worker releases it itself.
        assert client.lookup("late-1", hashes) == 0
        deadline = time.monotonic() + 5
        while server.late < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.late == 1 and "late-1" not in store._held and "late-1" in released
        # The scheduler's next call also releases the lookup it gave up on (a no-op here).
        assert client.lookup("req-2", hashes[:1]) == 1
        assert released.count("late-1") == 2
        client.release("req-2")
        assert not store._held
        # Nothing stays pinned: a full batch of new blocks still fits.
        _save(store, hashes[4:8])
        assert store.kv.stats()["rejected_full"] == 0
    finally:
        client.close()
        server.close()
        store.close()


def test_bad_frames_and_connection_floods_do_not_stop_the_service(tmp_path: Path) -> None:
    from dynblock.vllm.service import LookupClient, LookupServer, decode_request

    path = str(tmp_path / "lookup.sock")
    served = []
    server = LookupServer(path, lambda rid, hs, timeout=None: served.append(rid) or len(hs),
                          lambda rid: True)
    try:
        # A LOOKUP of 2**32-1 zero-length hashes: refused before anything is built.
        bad = struct.pack("<BH", 1, 1) + b"r" + struct.pack("<IHI", 0xFFFFFFFF, 0, 50)
        with pytest.raises(ValueError, match="hashes"):
            decode_request(bad)
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(path)
        s.sendall(struct.pack("<I", len(bad)) + bad)
        assert struct.unpack("<I", s.recv(8)[4:8])[0] == 0
        s.close()
        # 500 connect/close cycles and 40 idle connections (over MAX_CONNS): none stays.
        for _ in range(500):
            c = socket.socket(socket.AF_UNIX)
            c.connect(path)
            c.close()
        idle = []
        for _ in range(40):
            c = socket.socket(socket.AF_UNIX)
            c.connect(path)
            idle.append(c)
        time.sleep(0.3)
        assert server.connections <= LookupServer.MAX_CONNS
        for c in idle:
            c.close()
        deadline = time.monotonic() + 5
        while server.connections and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.connections == 0
        client = LookupClient(path, timeout=1.0)
        assert client.lookup("ok", [b"x" * 32] * 3) == 3 and served[-1] == "ok"
        client.close()
    finally:
        server.close()


def test_a_thread_limit_never_stops_the_service_from_accepting(tmp_path: Path) -> None:
    # Threads cannot be started once their stacks no longer fit RLIMIT_AS (a pids limit, or
    # RLIMIT_NPROC for a user, fails the same way: RuntimeError "can't start new thread").
    script = textwrap.dedent(f"""
        import resource, socket, threading, time
        from dynblock.vllm.service import LookupClient, LookupServer
        path = {str(tmp_path / "lookup.sock")!r}
        srv = LookupServer(path, lambda r, h, timeout=None: len(h), lambda r: True)
        threading.stack_size(64 << 20)  # every new thread needs 64 MiB of address space
        size = [int(l.split()[1]) << 10 for l in open("/proc/self/status")
                if l.startswith("VmSize")][0]
        resource.setrlimit(resource.RLIMIT_AS, (size + (160 << 20), resource.RLIM_INFINITY))
        idle = []
        for _ in range(20):
            c = socket.socket(socket.AF_UNIX)
            c.connect(path)
            idle.append(c)
        time.sleep(0.5)
        alive, refused = srv._thread.is_alive(), srv.refused
        for c in idle:
            c.close()
        deadline = time.monotonic() + 10
        while srv.connections and time.monotonic() < deadline:
            time.sleep(0.05)
        client = LookupClient(path, timeout=5)
        n = client.lookup("r", [b"x" * 32] * 3)
        client.close()
        deadline = time.monotonic() + 10
        while srv.connections and time.monotonic() < deadline:
            time.sleep(0.05)
        print(alive, refused > 0, n, srv.connections)
        srv.close()
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    # The accept loop lived through the failed starts, refused those connections, and serves.
    assert r.stdout.split() == ["True", "True", "3", "0"], (r.stdout, r.stderr[-2000:])


def _squat_runtime_dir(tmp_path: Path, monkeypatch) -> str:
    """Another user's name where the runtime dir goes (here: a file); the socket path then."""
    import tempfile

    from dynblock.vllm.keys import socket_path

    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    (tmp_path / f"dynblock-{os.geteuid()}").write_text("squatted")
    return socket_path("engine-x", 0)


def test_a_squatted_runtime_dir_falls_back_to_an_abstract_socket(tmp_path: Path,
                                                                monkeypatch) -> None:
    from dynblock.vllm.service import LookupClient, LookupServer

    path = _squat_runtime_dir(tmp_path, monkeypatch)
    assert path.startswith("\0dynblock-")
    server = LookupServer(path, lambda rid, hs, timeout=None: len(hs), lambda rid: True)
    try:
        client = LookupClient(path, timeout=1.0)
        assert client.lookup("r", [b"h" * 32] * 2) == 2
        client.close()
    finally:
        server.close()


def test_another_user_is_refused_on_the_abstract_socket(tmp_path: Path, monkeypatch) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to connect as another user")
    from dynblock.vllm.service import LookupServer

    path = _squat_runtime_dir(tmp_path, monkeypatch)
    server = LookupServer(path, lambda rid, hs, timeout=None: len(hs), lambda rid: True)
    try:
        # Anyone reaches an abstract name; SO_PEERCRED keeps other users out.
        probe = textwrap.dedent(f"""
            import socket, struct
            s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect({path!r})
            body = struct.pack("<BH", 3, 1) + b"r"
            try:
                s.sendall(struct.pack("<I", len(body)) + body)
                print(repr(s.recv(8)))
            except ConnectionError:
                print("refused")
        """)
        r = subprocess.run(["setpriv", "--reuid=4242", "--regid=4242", "--clear-groups",
                            sys.executable, "-c", probe], capture_output=True, text=True,
                           timeout=30)
        assert r.stdout.strip() in ("b''", "refused"), (r.stdout, r.stderr)  # no answer
        assert server.refused >= 1
    finally:
        server.close()


# ---- jobs and callbacks -----------------------------------------------------------------------
def _kv() -> BlockManager:
    return BlockManager(Config(block_size=BS, host_blocks=64, numa_node=None, pin=False))


def test_callbacks_that_wait_for_other_jobs_do_not_deadlock() -> None:
    kv = _kv()
    gate = threading.Event()
    blockers = [kv._submit("block", gate.wait) for _ in range(BlockManager.JOB_WORKERS)]
    jobs = [kv.put_async([i], data_for(i)) for i in range(8)]
    waited = []
    for j in jobs:
        j.add_done_callback(lambda j: (kv.wait_all(timeout=30), waited.append(1)))
    gate.set()
    kv.wait_all(timeout=30)
    assert all(j.wait(0) == 1 for j in jobs) and all(b.done() for b in blockers)
    kv.close()  # runs what is queued; does not hang
    assert len(waited) == 8


def test_close_from_a_done_callback_closes_the_manager() -> None:
    kv = _kv()
    done = threading.Event()
    errors = []

    def close_it(job) -> None:
        try:
            kv.close()
        except Exception as e:
            errors.append(e)
        done.set()

    gate = threading.Event()
    kv._submit("block", gate.wait).add_done_callback(close_it)  # still running: not inline
    later = kv.put_async([1], data_for(1))
    gate.set()
    assert done.wait(30) and not errors and kv.closed
    assert later.wait(0) == 1  # the pending job finished before the manager closed
    with pytest.raises(ValueError, match="closed"):
        kv.put([2], data_for(2))


def _raise_fork_error(_: int) -> None:
    raise dynblock.ForkError("storage used in a child made by fork()")


def test_every_dynblock_error_pickles_and_crosses_processes() -> None:
    for name in ("DynblockError", "CapacityError", "AlignmentError", "ODirectError", "NumaError",
                 "PinError", "StoreLockedError", "RemoteError", "ForkError", "EnvError"):
        cls = getattr(dynblock, name)
        e = pickle.loads(pickle.dumps(cls(f"{name}: details")))
        assert type(e) is cls and str(e) == f"{name}: details"
    with multiprocessing.get_context("fork").Pool(1) as pool:
        with pytest.raises(dynblock.ForkError, match="child made by fork"):
            pool.map(_raise_fork_error, [0])


# ---- partial loads, small things --------------------------------------------------------------
def test_get_each_reports_every_block_that_arrived_past_a_bad_one(tmp_path: Path) -> None:
    path = tmp_path / "kv.bin"
    with open_store(path) as m:
        m.put([10, 11, 12, 13], blocks([10, 11, 12, 13]))  # disk-only: slots 0..3
        slot1 = m.disk.data_offset + 1 * m.disk.slot_stride
    flip(path, slot1 + 100)
    with open_store(path) as m:
        out = np.zeros(4 * BS, np.uint8)
        assert m.get_each([10, 11, 12, 13], out) == [True, False, True, True]
        want = blocks([10, 11, 12, 13]).reshape(4, BS)
        got = out.reshape(4, BS)
        assert np.array_equal(got[[0, 2, 3]], want[[0, 2, 3]])
        assert m.get_each_async([13, 99, 12], out[:3 * BS]).wait(30) == [True, False, True]


def test_urls_and_env_errors_say_what_to_fix() -> None:
    with pytest.raises(ValueError, match="percent-encode"):
        Config(block_size=BS, host_blocks=4, remote="redis://default:pa:ss@w/rd%@127.0.0.1:1")
        BlockManager(Config(block_size=BS, host_blocks=4, numa_node=None, pin=False,
                            remote="redis://default:pa:ss@w/rd%@127.0.0.1:1"))
    with pytest.raises(EnvError, match="DYNBLOCK_HOST_BYTES"):
        Config.from_env({"DYNBLOCK_HOST_BYTES": "2"}, block_size=BS)


@pytest.mark.parametrize("disk_eviction", ["lru", "s3fifo"])
def test_write_behind_ends_when_the_disk_tier_is_smaller_than_the_host_tier(
        tmp_path: Path, disk_eviction: str) -> None:
    """A disk tier that cannot hold half the host tier: each write-behind step would evict
    the copies an earlier step wrote. `flush()` returns, and the write-behind thread goes
    quiet once the puts stop (it used to rewrite the same blocks forever). Run in a
    subprocess with a deadline, so that a regression fails instead of hanging the suite."""
    r = run_py(f"""
        import time
        from dynblock import BlockManager, Config
        bs = 64 << 10
        cfg = Config(block_size=bs, host_blocks=512, disk_blocks=64, disk_dir={str(tmp_path)!r},
                     numa_node=None, pin=False, disk_eviction={disk_eviction!r})
        with BlockManager(cfg) as m:
            src = np.ones(16 * bs, dtype=np.uint8)
            for i in range(0, 480, 16):
                m.put(np.arange(i + 1, i + 17, dtype=np.uint64), src)
            m.flush()
            time.sleep(0.5)  # the write-behind thread finishes its round
            a = m.stats()["written_behind"]
            time.sleep(1.0)
            b = m.stats()["written_behind"]
            out = np.zeros(bs, dtype=np.uint8)
            assert m.get([1], out) == 1 and out.min() == 1
        print("ok", a, b)
    """)
    assert r.returncode == 0, r.stdout + r.stderr
    _, a, b = r.stdout.split()
    assert int(a) > 0  # write-behind ran
    assert a == b  # and stopped
