"""Namespaces (tenants): the same hash in two namespaces is two blocks on every call, a
namespace's blocks are counted, purged and kept across a restart and kill -9, and bad names
are refused before anything changes. Real tiers, real files, a real subprocess killed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dynblock import BlockManager, Config
from conftest import PRELUDE
from test_durability import BS, data_for, get_one, open_store


def other_for(h: int) -> np.ndarray:
    """Bytes for hash `h` in namespace "a": unlike the shared namespace's `data_for(h)`."""
    return np.random.default_rng(10_000 + h).integers(0, 256, size=BS, dtype=np.uint8)


def run_then(code: str, end: str) -> None:
    """Run ``code`` (which opens a store as ``m``) in a fresh interpreter, then end it:
    ``"close"`` closes the store and exits; ``"kill"`` kills the process (SIGKILL) once the
    code has run."""
    tail = "m.close()" if end == "close" else 'print("ready", flush=True)\nimport time\ntime.sleep(60)'
    p = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(code) + "\n" + tail],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if end == "kill":
        assert p.stdout is not None and p.stdout.readline().strip() == "ready", p.stderr
        p.kill()
    assert p.wait(timeout=60) in (0, -9)


def get_in(m, h: int, ns):
    out = np.zeros(BS, np.uint8)
    return out if m.get([h], out, namespace=ns) == 1 else None


@pytest.mark.parametrize("tiers", [(4, 0), (0, 8), (2, 8)], ids=["host", "disk", "both"])
def test_the_same_hash_in_two_namespaces_is_two_blocks(tmp_path: Path, tiers) -> None:
    host, disk = tiers
    cfg = Config(block_size=BS, host_blocks=host, disk_blocks=disk, disk_dir=str(tmp_path),
                 numa_node=None, pin=False)
    with BlockManager(cfg) as m:
        m.put([1, 2], np.concatenate([data_for(1), data_for(2)]))
        assert m.match([1, 2], namespace="a") == 0 and not m.contains(1, namespace="a")
        assert m.put([1, 2], np.concatenate([other_for(1), other_for(2)]), namespace="a") == 2
        assert len(m) == 4
        assert np.array_equal(get_in(m, 1, "a"), other_for(1))
        assert np.array_equal(get_in(m, 1, None), data_for(1))
        with m.lookup([1, 2], namespace="a") as lease:
            assert lease.count == 2 and lease.namespace == "a"
            dst = np.zeros(2 * BS, np.uint8)
            assert m.get(lease, dst) == 2
            assert np.array_equal(dst[:BS], other_for(1)) and np.array_equal(dst[BS:], other_for(2))
        job = m.get_async([2], dst[:BS], namespace="a")
        assert job.wait(timeout=30) == 1 and np.array_equal(dst[:BS], other_for(2))
        assert m.get_each([1, 9, 2], np.zeros(3 * BS, np.uint8), namespace="a") == [True, False, True]
        # Removing in one namespace leaves the other's block of the same hash.
        assert m.remove([1], namespace="a") == 1
        assert not m.contains(1, namespace="a") and 1 in m
        assert np.array_equal(get_one(m, 1), data_for(1))
        # A name nobody put into: every query misses, and it is not added.
        assert m.match([1, 2], namespace="b") == 0 and m.touch([1], namespace="b") == 0
        assert m.get([1], np.zeros(BS, np.uint8), namespace="b") == 0
        assert m.remove([1], namespace="b") == 0 and m.purge("b") == 0
        assert m.namespaces() == ["a"]


def test_stats_and_purge_of_one_namespace(tmp_path: Path) -> None:
    with open_store(tmp_path / "s", disk_blocks=16, host_blocks=4) as m:
        m.put([1, 2, 3], np.concatenate([data_for(h) for h in (1, 2, 3)]))
        m.put([1, 2, 3, 4, 5, 6], np.concatenate([other_for(h) for h in range(1, 7)]), namespace="a")
        m.get([1, 2, 7], np.zeros(3 * BS, np.uint8), namespace="a")
        a = m.stats(namespace="a")
        assert a["namespace"] == "a"
        assert (a["put_blocks"], a["put_new"], a["misses"]) == (6, 6, 1)
        assert a["host_hits"] + a["disk_hits"] == 2
        assert a["host_blocks_used"] + a["disk_blocks_used"] >= 6  # some have both copies
        assert a["host_bytes_used"] == a["host_blocks_used"] * BS
        m.get([1], np.zeros(BS, np.uint8), namespace="nobody")  # a miss in a name never put into
        m.get([1, 9], np.zeros(2 * BS, np.uint8))
        # Write-behind copies host blocks to disk in the background: let it finish, so the
        # three snapshots below see the same tiers.
        m.flush()
        shared = m.stats(namespace=None)
        whole = m.stats()
        assert (shared["put_blocks"], shared["put_new"], shared["misses"]) == (3, 3, 1)
        assert shared["host_hits"] + shared["disk_hits"] == 1
        assert whole["misses"] == 3 and m.stats(namespace="nobody")["misses"] == 0
        a = m.stats(namespace="a")
        assert shared["host_blocks_used"] + a["host_blocks_used"] == whole["host_blocks_used"]
        assert shared["disk_blocks_used"] + a["disk_blocks_used"] == whole["disk_blocks_used"]
        assert m.purge("a") == 6
        a = m.stats(namespace="a")
        assert (a["host_blocks_used"], a["disk_blocks_used"]) == (0, 0)
        assert all(h in m for h in (1, 2, 3)) and len(m) == 3
        assert np.array_equal(get_one(m, 2), data_for(2))
        assert m.namespaces() == ["a"]  # the name stays known


def test_tier_events_name_the_namespace() -> None:
    with BlockManager(Config(block_size=BS, host_blocks=2, numa_node=None, pin=False)) as m:
        m.watch_events()
        m.put([5], data_for(5), namespace="tenant-1")
        m.put([5], data_for(5))
        m.put([6], data_for(6))  # evicts tenant-1's 5
        ev = m.take_events()
        assert [(e.kind, e.hash, e.namespace) for e in ev] == [
            ("stored", 5, "tenant-1"), ("stored", 5, None), ("removed", 5, "tenant-1"),
            ("stored", 6, None)]


@pytest.mark.parametrize("end", ["close", "kill"])
def test_namespaces_and_their_blocks_survive_a_restart(tmp_path: Path, end: str) -> None:
    """Blocks of the shared namespace and of "a" and "b" with the same hashes, a purge of
    "b", then a clean close or kill -9: reopened, each namespace has its own bytes, the
    purged blocks stay gone, and the names are known in their order."""
    path = tmp_path / "store"
    code = f"""
        m = open_store({str(path)!r}, disk_blocks=16)
        other = lambda h: np.random.default_rng(10_000 + h).integers(0, 256, size=BS, dtype=np.uint8)
        m.put([1, 2], np.concatenate([data_for(1), data_for(2)]))
        m.put([1, 2], np.concatenate([other(1), other(2)]), namespace="a")
        m.put([1, 3], np.concatenate([data_for(7), data_for(8)]), namespace="b")
        assert m.purge("b") == 2
        m.put([4], data_for(9), namespace="b")
    """
    run_then(code, end)
    with open_store(path, disk_blocks=16) as m:
        assert m.namespaces() == ["a", "b"]
        assert len(m) == 5
        assert np.array_equal(get_in(m, 1, None), data_for(1))
        assert np.array_equal(get_in(m, 1, "a"), other_for(1))
        assert np.array_equal(get_in(m, 2, "a"), other_for(2))
        assert get_in(m, 1, "b") is None and get_in(m, 3, "b") is None  # purged
        assert np.array_equal(get_in(m, 4, "b"), data_for(9))
        assert m.stats(namespace="a")["disk_blocks_used"] == 2
        # A name new to the reopened store gets the next id: nothing aliases the old ones.
        m.put([1], data_for(11), namespace="c")
        assert np.array_equal(get_in(m, 1, "c"), data_for(11))
        assert np.array_equal(get_in(m, 1, "a"), other_for(1))
    assert sorted(os.listdir(tmp_path)) == ["store", "store.index", "store.index.namespaces"]


def test_a_store_whose_namespace_table_is_damaged_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with open_store(path) as m:
        m.put([1], data_for(1), namespace="a")
    table = Path(str(path) + ".index.namespaces")
    assert table.read_text() == "1 61\n"  # id, then the name as hex of its UTF-8
    table.write_text("1 zz\n")
    with pytest.raises(ValueError, match=r"namespaces line 1 is not a namespace"):
        open_store(path)
    # Whoever could write the table could map a name to another tenant's blocks: it must be
    # a private file of this user, not a link.
    table.write_text("1 61\n")
    table.chmod(0o644)
    with pytest.raises(ValueError, match=r"namespace table .* has permissions 0644"):
        open_store(path)
    table.chmod(0o600)
    link = Path(str(table) + ".real")
    table.rename(link)
    table.symlink_to(link)
    with pytest.raises(ValueError, match=r"is a symbolic link"):
        open_store(path)
    link.unlink()
    table.unlink()
    with open_store(path) as m:  # without the table: the blocks are kept but nobody can name them
        assert m.namespaces() == [] and len(m) == 1 and m.match([1], namespace="a") == 0
        # A new name does not take the orphaned blocks' id: it never sees them.
        assert m.match([1], namespace="new") == 0
        m.put([2], data_for(2), namespace="new")
        assert m.match([1], namespace="new") == 0 and m.namespaces() == ["new"]
    assert table.read_text() == "2 6e6577\n"  # id 1 is held back
    with open_store(path) as m:
        assert m.namespaces() == ["new"] and m.match([1, 2], namespace="new") == 0
        assert m.contains(2, namespace="new")


@pytest.mark.parametrize("bad, exc", [(5, TypeError), (b"a", TypeError), ("", ValueError),
                                      ("x" * 1025, ValueError), ("\u00e9" * 513, ValueError)])
def test_a_bad_namespace_is_refused_and_changes_nothing(tmp_path: Path, bad, exc) -> None:
    with open_store(tmp_path / "s") as m:
        m.put([1], data_for(1))
        before = (m.stats(), m.lru_order(), m.namespaces())
        for call in (lambda: m.put([2], data_for(2), namespace=bad),
                     lambda: m.put_async([2], data_for(2), namespace=bad),
                     lambda: m.get([1], np.zeros(BS, np.uint8), namespace=bad),
                     lambda: m.match([1], namespace=bad),
                     lambda: m.lookup([1], namespace=bad),
                     lambda: m.contains(1, namespace=bad),
                     lambda: m.touch([1], namespace=bad),
                     lambda: m.remove([1], namespace=bad),
                     lambda: m.purge(bad),
                     lambda: m.stats(namespace=bad)):
            with pytest.raises(exc, match="namespace"):
                call()
        assert (m.stats(), m.lru_order(), m.namespaces()) == before
        with pytest.raises(TypeError, match="purge needs a namespace"):
            m.purge(None)  # type: ignore[arg-type]
        # A put whose buffer is refused does not add its namespace.
        with pytest.raises(ValueError):
            m.put([2, 3], data_for(2), namespace="new")
        assert m.namespaces() == []
    assert sorted(os.listdir(tmp_path)) == ["s", "s.index"]


def host_store(blocks: int = 8) -> BlockManager:
    return BlockManager(Config(block_size=BS, host_blocks=blocks, numa_node=None, pin=False))


def test_a_namespace_at_its_quota_evicts_its_own_blocks() -> None:
    with host_store(8) as m:
        m.set_quota("flood", host_bytes=4 * BS)
        m.put([1, 2, 3, 4], np.concatenate([data_for(h) for h in (1, 2, 3, 4)]), namespace="a")
        for h in range(100, 200):
            m.put([h], data_for(h), namespace="flood")
        assert all(m.contains(h, namespace="a") for h in (1, 2, 3, 4))
        # The flood keeps its 4 most recent blocks; one asked for again stays.
        assert [h for h in range(100, 200) if m.contains(h, namespace="flood")] == [196, 197, 198, 199]
        m.touch([196], namespace="flood")
        m.put([200], data_for(200), namespace="flood")
        assert [h for h in range(100, 201) if m.contains(h, namespace="flood")] == [196, 198, 199, 200]
        part = m.stats(namespace="flood")
        assert (part["host_blocks_used"], part["host_quota_bytes"], part["disk_quota_bytes"]) == (4, 4 * BS, None)
        # Without the quota the flood pushes out the other namespace's blocks.
        m.set_quota("flood")
        for h in range(300, 310):
            m.put([h], data_for(h), namespace="flood")
        assert not any(m.contains(h, namespace="a") for h in (1, 2, 3, 4))
        assert m.stats(namespace="flood")["host_quota_bytes"] is None


def test_a_lowered_quota_evicts_at_once_offloading_to_disk(tmp_path: Path) -> None:
    with open_store(tmp_path / "s", disk_blocks=16, host_blocks=8, write_behind=False) as m:
        m.put(list(range(6)), np.concatenate([data_for(h) for h in range(6)]), namespace="a")
        assert m.stats(namespace="a")["host_blocks_used"] == 6
        m.set_quota("a", host_bytes=2 * BS + 100)  # rounded down: 2 blocks
        a = m.stats(namespace="a")
        assert (a["host_blocks_used"], a["disk_blocks_used"]) == (2, 4)
        assert all(np.array_equal(get_in(m, h, "a"), data_for(h)) for h in range(6))
        m.set_quota("a", disk_bytes=3 * BS)  # no host quota now; 3 disk blocks
        assert m.stats(namespace="a")["disk_blocks_used"] <= 3


@pytest.mark.parametrize("end", ["close", "kill"])
def test_quotas_survive_a_restart(tmp_path: Path, end: str) -> None:
    path = tmp_path / "store"
    code = f"""
        m = open_store({str(path)!r}, disk_blocks=16)
        m.set_quota("a", disk_bytes=3 * BS)
        m.set_quota("b", disk_bytes=5 * BS)
        m.put(list(range(10)), np.concatenate([data_for(h) for h in range(10)]), namespace="a")
        assert m.stats(namespace="a")["disk_blocks_used"] == 3
    """
    run_then(code, end)
    with open_store(path, disk_blocks=16) as m:
        a = m.stats(namespace="a")
        assert (a["disk_quota_bytes"], a["disk_blocks_used"]) == (3 * BS, 3)
        assert m.stats(namespace="b")["disk_quota_bytes"] == 5 * BS
        assert [h for h in range(10) if m.contains(h, namespace="a")] == [7, 8, 9]
        m.put([20, 21], np.concatenate([data_for(20), data_for(21)]), namespace="a")
        held = [h for h in range(30) if m.contains(h, namespace="a")]
        assert len(held) == 3 and held[0] in (7, 8, 9) and held[1:] == [20, 21]


S3FIFO_QUOTA_STEPS = """
    m.set_quota("a", disk_bytes=4 * BS)
    m.put(list(range(4)), np.concatenate([data_for(h) for h in range(4)]), namespace="a")
    out = np.zeros(BS, np.uint8)
    for h in (0, 1):
        assert m.get([h], out, namespace="a") == 1
    m.put([4], data_for(4), namespace="a")
    assert [h for h in range(5) if m.contains(h, namespace="a")] == [0, 1, 3, 4]
"""


@pytest.mark.parametrize("end", ["close", "kill", "none"])
def test_a_namespaces_own_s3fifo_order_survives_a_restart(tmp_path: Path, end: str) -> None:
    """Namespace "a" may hold 4 slots of an S3-FIFO disk tier. Blocks 0-3 are put, 0 and 1
    asked for again; block 4 makes "a" evict one of its own: 0 and 1 (asked for) move to the
    main queue, 2 (not) leaves. Then, after a clean close, kill -9 or no restart at all,
    blocks 5 and 6 find a's small queue at its share (2 of its 4 blocks): 3 and 4 leave, 0
    and 1 stay. Were the order lost (every block back in the small queue in write order, no
    count), 0 and 1 would leave first."""
    path = tmp_path / "store"
    kw = dict(disk_blocks=16, disk_eviction="s3fifo")
    if end == "none":
        m = open_store(path, **kw)
        exec(textwrap.dedent(S3FIFO_QUOTA_STEPS), {"m": m, "np": np, "BS": BS, "data_for": data_for})
    else:
        run_then(f"m = open_store({str(path)!r}, **{kw!r})\n"
                 + textwrap.dedent(S3FIFO_QUOTA_STEPS), end)
        m = open_store(path, **kw)
    with m:
        for h in (5, 6):
            m.put([h], data_for(h), namespace="a")
        kept = [h for h in range(7) if m.contains(h, namespace="a")]
        assert kept == [0, 1, 5, 6]
        assert all(np.array_equal(get_in(m, h, "a"), data_for(h)) for h in kept)


def test_a_bad_quota_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    with open_store(tmp_path / "s") as m:
        m.put([1], data_for(1), namespace="a")
        for bad, exc, match in [
                (dict(namespace=None), TypeError, "set_quota needs a namespace"),
                (dict(namespace="b", host_bytes=BS - 1), ValueError, r"host_bytes must be at least one block"),
                (dict(namespace="b", disk_bytes=-1), ValueError, r"disk_bytes must be an int >= 0"),
                (dict(namespace="b", disk_bytes=True), ValueError, r"disk_bytes must be an int >= 0"),
                (dict(namespace="b", host_bytes=1.5), ValueError, r"host_bytes must be an int >= 0"),
                (dict(namespace=""), ValueError, "namespace must be a non-empty str")]:
            with pytest.raises(exc, match=match):
                m.set_quota(**bad)
        assert m.namespaces() == ["a"]
        assert m.stats(namespace="a")["host_quota_bytes"] is None
    assert open(str(tmp_path / "s") + ".index.namespaces").read() == "1 61\n"


def replay_hit_rate(m: BlockManager, ns: str, requests, flood=None, flood_per_request: int = 0) -> float:
    """Replay `requests` (lists of hashes, a prefix each) as an engine would: match, get
    what is there, put the rest. Between requests, `flood` puts `flood_per_request` one-off
    blocks of its own. Returns the share of blocks found."""
    hits = total = 0
    src = np.zeros(BS, np.uint8)
    nxt = 10**9
    for req in requests:
        n = m.match(req, namespace=ns)
        if n:
            m.get(req[:n], np.zeros(n * BS, np.uint8), namespace=ns)
        if len(req) > n:
            m.put(req[n:], np.zeros((len(req) - n) * BS, np.uint8), namespace=ns)
        hits += n
        total += len(req)
        for _ in range(flood_per_request):
            m.put([nxt], src, namespace=flood)
            nxt += 1
    return hits / total


def tenant_trace(seed: int = 0, n: int = 400):
    """Conversations that come back: each request is a shared prefix (one of 6 system
    prompts of 4 blocks) plus its conversation's earlier blocks plus a new turn."""
    rng = np.random.default_rng(seed)
    convs: list = []
    out = []
    for _ in range(n):
        if convs and rng.random() < 0.6:
            c = convs[int(rng.integers(len(convs)))]
        else:
            c = [int(p) * 100 + j for p in [rng.integers(6)] for j in range(4)]
            convs.append(c)
        c += [int(rng.integers(1, 2**62))]
        out.append(list(c))
        if len(convs) > 12:
            convs.pop(0)
    return out


def test_a_tenant_under_a_tenfold_flood_keeps_its_hit_rate() -> None:
    """Tenant "a" replays its trace alone, then with tenant "flood" putting 10x as many
    one-off blocks: with quotas that split the host tier, "a"'s hit rate stays within 5% of
    its hit rate alone; without them the flood takes most of it (so the check can fail)."""
    trace = tenant_trace()
    rates = {}
    for case in ("alone", "flood", "flood, no quotas"):
        with host_store(256) as m:
            if case != "flood, no quotas":
                m.set_quota("a", host_bytes=192 * BS)
                m.set_quota("flood", host_bytes=64 * BS)
            per = 0 if case == "alone" else 10 * sum(len(r) for r in trace) // len(trace)
            rates[case] = replay_hit_rate(m, "a", trace, "flood", per)
    assert rates["alone"] > 0.5, rates
    assert rates["flood"] >= 0.95 * rates["alone"], rates
    assert rates["flood, no quotas"] < 0.8 * rates["alone"], rates
