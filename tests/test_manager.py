"""The block manager against a pure-Python model of its policy, on real tiers
(anonymous O_DIRECT file, mmap'd host memory), plus threads and bad input."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import textwrap
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import dynblock
from dynblock import BlockManager, Config, HostStorage
from conftest import PRELUDE, fill_up, run_py
from redis_servers import Server
from test_durability import BS, blocks, data_for, get_one, open_store


def mix(v: int) -> int:
    """The splitmix64 finaliser (rust/manager/policy.rs `mix`)."""
    m = (1 << 64) - 1
    z = (v + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


class TierOrder:
    """One tier's eviction order, as documented in rust/manager/mod.rs: "lru" or "s3fifo".
    Iterates first to leave first (what ``lru_order`` lists)."""

    SMALL_PERCENT = 60
    MAX_FREQ = 3

    def __init__(self, kind: str, cap: int, ns_of=lambda h: 0) -> None:
        self.kind = kind
        self.ns_of = ns_of
        self.small: "OrderedDict[int, None]" = OrderedDict()  # LRU's only list
        self.main: "OrderedDict[int, None]" = OrderedDict()
        self.freq: Dict[int, int] = {}
        self.small_cap = max(1, cap * self.SMALL_PERCENT // 100)
        # The ghost: the last `window` hashes added (window: the slots past the small queue's
        # share), each in the entry of a table of next_power_of_two(2 * window) entries that
        # the low bits of mix(h) pick, as (h, count of adds);
        # a later hash landing there replaces it.
        self.window = max(0, cap - self.small_cap) if kind == "s3fifo" else 0
        self.ghost: List[Optional[tuple]] = (
            [None] * (1 << (2 * self.window - 1).bit_length()) if self.window else [])
        self.adds = 0

    def _ghost_take(self, h: int) -> bool:
        if not self.ghost:
            return False
        m = mix(h)
        i = m & (len(self.ghost) - 1)
        e = self.ghost[i]
        if e is not None and e[0] == h and self.adds - e[1] < self.window:
            self.ghost[i] = None
            return True
        return False

    def _ghost_add(self, h: int) -> None:
        if self.ghost:
            m = mix(h)
            self.adds += 1
            self.ghost[m & (len(self.ghost) - 1)] = (h, self.adds)

    def __contains__(self, h: int) -> bool:
        return h in self.small or h in self.main

    def __iter__(self):
        return iter(list(self.small) + list(self.main))

    def __len__(self) -> int:
        return len(self.small) + len(self.main)

    def own(self, q: "OrderedDict[int, None]", ns: int) -> List[int]:
        """Namespace `ns`'s blocks in queue `q`, in its order (a namespace's own order is the
        tier's, restricted to it)."""
        return [h for h in q if self.ns_of(h) == ns]

    def insert(self, h: int) -> None:
        self.freq[h] = 0
        if self._ghost_take(h):
            self.main[h] = None
        else:
            self.small[h] = None

    def touch(self, h: int) -> None:
        if self.kind == "lru":
            self.small.move_to_end(h)
        else:
            self.freq[h] = min(self.freq[h] + 1, self.MAX_FREQ)

    def remove(self, h: int) -> None:
        self.small.pop(h, None)
        self.main.pop(h, None)
        self.freq.pop(h, None)

    def held_by(self, ns: int) -> int:
        return len(self.own(self.small, ns)) + len(self.own(self.main, ns))

    def _leaves(self, q: "OrderedDict[int, None]", h: int) -> bool:
        """S3-FIFO's step on the oldest candidate `h` of queue `q`: the victim if its count is
        0 (remembered in the ghost when it leaves the small queue); else it moves to the back
        of the main queue, its count reset (from the small queue) or lowered by one."""
        if self.freq[h] == 0:
            if q is self.small:
                self._ghost_add(h)
            return True
        self.freq[h] = 0 if q is self.small else self.freq[h] - 1
        del q[h]
        self.main[h] = None
        return False

    def victim_in(self, ns: int, pinned) -> Optional[int]:
        """Namespace `ns`'s own victim: LRU's least recent unpinned block of it; S3-FIFO's
        search over its own blocks, with their share in the small queue in place of the
        tier's: sought among its small-queue blocks while they are at least 60% of its blocks
        (rounded down, at least one; or none of them is in the main queue), else among its
        main-queue ones; the blocks move in the tier as `victim` moves them."""
        if self.kind == "lru":
            return next((h for h in self.own(self.small, ns) if not pinned(h)), None)
        while True:
            small, main = self.own(self.small, ns), self.own(self.main, ns)
            share = max(1, (len(small) + len(main)) * self.SMALL_PERCENT // 100)
            small_first = len(small) >= share or not main
            queues = ((self.small, small), (self.main, main))
            found = next(((q, h) for q, mine in (queues if small_first else queues[::-1])
                          for h in mine if not pinned(h)), None)
            if found is None:
                return None
            if self._leaves(*found):
                return found[1]

    def victim(self, pinned) -> Optional[int]:
        """The block to evict (S3-FIFO moves blocks on the way), None if all are pinned."""
        if self.kind == "lru":
            return next((h for h in self.small if not pinned(h)), None)
        while True:
            small_first = len(self.small) >= self.small_cap or not self.main
            queues = (self.small, self.main) if small_first else (self.main, self.small)
            found = next(((q, h) for q in queues for h in q if not pinned(h)), None)
            if found is None:
                return None
            if self._leaves(*found):
                return found[1]


class PolicyModel:
    """The documented policy, block by block (see rust/manager/mod.rs)."""

    def __init__(self, host_cap: int, disk_cap: int, admission: str = "all",
                 host_eviction: str = "lru", disk_eviction: str = "lru", ns_of=lambda h: 0) -> None:
        self.H, self.D = host_cap, disk_cap
        # Blocks are model keys; `ns_of` names a key's namespace id (0: the shared one).
        # Quotas in slots per namespace: {"host": n or None, "disk": n or None}.
        self.ns_of = ns_of
        self.quotas: Dict[int, Dict[str, Optional[int]]] = {}
        # disk_admission: with "reuse" a host victim goes to disk only if it was asked for
        # again since it entered the host tier, or its hash was turned away before (the last
        # H + D turned away are remembered, oldest forgotten first).
        self.admission = admission
        self.asked: "set[int]" = set()
        self.ghost: "OrderedDict[int, None]" = OrderedDict()
        self.not_admitted = 0
        self.host = TierOrder(host_eviction, host_cap, ns_of)
        self.disk = TierOrder(disk_eviction, disk_cap, ns_of)
        self.data: Dict[int, bytes] = {}
        self.dropped = 0
        self.rejected = 0
        self.inflight = None
        # Leases: pins per (tier, hash) of a stored block; slots of blocks removed while
        # pinned ("doomed") stay out of use until their last unpin.
        self.pins: Dict[tuple, int] = {}
        self.doomed: Dict[tuple, int] = {}  # (tier, token) -> pins left
        self.leases: Dict[int, List[tuple]] = {}
        self.next_lease = 0
        self.doomed_tokens = 0

    def _used(self, tier: str) -> int:
        blocks = self.host if tier == "host" else self.disk
        return len(blocks) + sum(1 for (t, _) in self.doomed if t == tier)

    def _evictable(self, tier: str):
        blocks = self.host if tier == "host" else self.disk
        return blocks.victim(lambda h: self.pins.get((tier, h)))

    def _release_slot(self, tier: str, h: int) -> None:
        """A stored block leaves `tier`; a pinned slot becomes doomed."""
        n = self.pins.pop((tier, h), 0)
        if n:
            self.doomed_tokens += 1
            self.doomed[(tier, f"doomed{self.doomed_tokens}")] = n
            for pins in self.leases.values():  # the lease's pins now point at the doomed slot
                for i, p in enumerate(pins):
                    if p == (tier, h):
                        pins[i] = (tier, f"doomed{self.doomed_tokens}")

    def present(self, h: int) -> bool:
        return h in self.host or h in self.disk

    def touch(self, h: int) -> None:
        if h in self.host:
            self.host.touch(h)
            self.asked.add(h)
        if h in self.disk:
            self.disk.touch(h)

    def _drop(self, h: int) -> None:
        self.data.pop(h, None)
        self.dropped += 1

    def _at_quota(self, tier: str, ns: int) -> bool:
        q = self.quotas.get(ns, {}).get(tier)
        blocks = self.host if tier == "host" else self.disk
        return ns != 0 and q is not None and blocks.held_by(ns) >= q

    def _own_victim(self, tier: str, ns: int) -> Optional[int]:
        blocks = self.host if tier == "host" else self.disk
        return blocks.victim_in(ns, lambda h: self.pins.get((tier, h)))

    def _evict_host(self, v: int) -> None:
        """The host victim `v` leaves the host tier: offloaded, kept on disk, or dropped."""
        self.host.remove(v)
        asked = v in self.asked
        self.asked.discard(v)
        if v in self.disk:
            return
        if self.D and self.admission == "reuse" and not asked:
            self._drop(v)
            self.not_admitted += 1
            if v not in self.ghost:
                self.ghost[v] = None
                while len(self.ghost) > self.H + self.D:
                    self.ghost.popitem(last=False)
            return
        if not (self.D and self.disk_insert(v)):
            self._drop(v)

    def _evict_disk(self, w: int) -> None:
        self.disk.remove(w)
        if w not in self.host and w != self.inflight:
            self._drop(w)

    def _make_room(self, tier: str, ns: int) -> bool:
        """Evict until a block of `ns` may take a slot of `tier`: at its quota, its own
        victim; else, while the tier is full, the tier's. False when every slot it could
        take is leased."""
        cap, evict = (self.H, self._evict_host) if tier == "host" else (self.D, self._evict_disk)
        while True:
            if self._at_quota(tier, ns):  # it takes the place of its own
                v = self._own_victim(tier, ns)
            elif self._used(tier) >= cap:
                v = self._evictable(tier)
            else:
                return True
            if v is None:
                return False
            evict(v)

    def host_insert(self, h: int) -> bool:
        self.inflight = h  # its own eviction cascade must not drop it
        if not self._make_room("host", self.ns_of(h)):
            self.inflight = None
            return False
        self.host.insert(h)
        if h in self.ghost:  # its second sighting
            del self.ghost[h]
            self.asked.add(h)
        else:
            self.asked.discard(h)
        self.inflight = None
        return True

    def disk_insert(self, h: int) -> bool:
        if not self._make_room("disk", self.ns_of(h)):
            return False
        self.disk.insert(h)
        return True

    def set_quota(self, ns: int, host: Optional[int], disk: Optional[int]) -> None:
        """Quotas in slots; blocks past them leave now, each its namespace's own victim."""
        self.quotas[ns] = {"host": host, "disk": disk}
        for tier, q, evict in (("host", host, self._evict_host), ("disk", disk, self._evict_disk)):
            blocks = self.host if tier == "host" else self.disk
            if q is None or not (self.H if tier == "host" else self.D):
                continue
            while blocks.held_by(ns) > q:
                v = self._own_victim(tier, ns)
                if v is None:
                    break
                evict(v)

    def put(self, hashes: List[int], blocks: List[bytes],
            inserted: "Optional[List[tuple]]" = None) -> int:
        # Blocks of the batch already stored are refreshed first, so the batch's own new
        # blocks never evict them. `inserted` collects (hash, bytes) of every block that was
        # not stored when its turn came (what goes to a remote tier).
        for h in hashes:
            if self.present(h):
                self.touch(h)
        new = 0
        for h, b in zip(hashes, blocks):
            if self.present(h):
                self.touch(h)
                continue
            if inserted is not None:
                inserted.append((h, b))
            if self.host_insert(h) if self.H else self.disk_insert(h):
                new += 1
                self.data[h] = b
            else:
                self.rejected += 1
        return new

    def match(self, hashes: List[int]) -> int:
        n = 0
        for h in hashes:
            if not self.present(h):
                break
            n += 1
        return n

    def get(self, hashes: List[int]) -> List[bytes]:
        n = self.match(hashes)
        got = [self.data[h] for h in hashes[:n]]
        disk_only = [h for h in hashes[:n] if h not in self.host]
        for h in hashes[:n]:
            self.touch(h)
        if self.H:
            for h in disk_only:
                if h in self.host:
                    continue
                if self.host_insert(h):  # may drop its own disk copy: bytes come from `got`
                    self.data[h] = got[hashes.index(h)]
                elif h not in self.disk:
                    self.data.pop(h, None)
        return got

    def remove(self, hashes: List[int]) -> int:
        n = 0
        for h in hashes:
            if self.present(h):
                n += 1
                for tier, blocks in (("host", self.host), ("disk", self.disk)):
                    if h in blocks:
                        blocks.remove(h)
                        self._release_slot(tier, h)
                del self.data[h]
        return n

    def lookup(self, hashes: List[int]) -> "tuple[int, int]":
        n = self.match(hashes)
        pins = [("host", h) if h in self.host else ("disk", h) for h in hashes[:n]]
        for p in pins:
            self.pins[p] = self.pins.get(p, 0) + 1
        self.next_lease += 1
        self.leases[self.next_lease] = pins
        return self.next_lease, n

    def release(self, lease: int) -> None:
        for p in self.leases.pop(lease):
            if p in self.doomed:
                self.doomed[p] -= 1
                if not self.doomed[p]:
                    del self.doomed[p]
            else:
                self.pins[p] -= 1
                if not self.pins[p]:
                    del self.pins[p]

    def get_lease(self, lease: int, hashes: List[int]) -> List[bytes]:
        got = self.get(hashes)
        self.release(lease)
        return got


hash_lists = st.lists(st.integers(0, 12), min_size=1, max_size=6)
# None: the shared namespace; "a" and "b" get ids 1, 2, ... in the order of their first put.
namespaces = st.sampled_from([None, None, "a", "b"])
GOLDEN = 0x9E3779B97F4A7C15
UNKNOWN_NS = 0xFFFFFFFF  # the id of a name never put into: every query in it misses


def fold(ns_id: int, h: int) -> int:
    """A block's key (namespace id, hash) folded into 64 bits as the store does for its maps
    and its S3-FIFO ghost (rust/keys.rs `Key::fold`); the shared namespace folds to the hash.
    The model uses it as the block's name: for the hashes and ids here, distinct keys fold
    to distinct values."""
    return h ^ ((ns_id * GOLDEN) & ((1 << 64) - 1))


class ManagerMachine(RuleBasedStateMachine):
    @initialize(
        caps=st.sampled_from([(0, 3), (1, 0), (2, 0), (1, 1), (2, 3), (3, 2), (2, 5), (4, 4)]),
        block_size=st.sampled_from([512, 1000, 4096]),
        o_direct=st.booleans(),
        admission=st.sampled_from(["all", "reuse"]),
        eviction=st.sampled_from([("lru", "lru"), ("s3fifo", "s3fifo"), ("lru", "s3fifo"),
                                  ("s3fifo", "lru")]),
    )
    def setup(self, caps, block_size, o_direct, admission, eviction) -> None:
        self.open(caps, block_size, o_direct, disk_admission=admission,
                  host_eviction=eviction[0], disk_eviction=eviction[1])

    def open(self, caps, block_size, o_direct, **extra) -> None:
        self.dir = tempfile.mkdtemp(prefix="dynblock-model-")
        h, d = caps
        self.bs = block_size
        self.model = PolicyModel(h, d, extra.get("disk_admission", "all"),
                                 extra.get("host_eviction", "lru"), extra.get("disk_eviction", "lru"),
                                 ns_of=lambda k: self.ns_of[k])
        # The model is the synchronous policy: no background write-behind.
        cfg = Config(block_size=block_size, host_blocks=h, disk_blocks=d, disk_dir=self.dir,
                     o_direct=o_direct, numa_node=None, pin=False, io_depth=3, write_behind=False,
                     **extra)
        self.m = BlockManager(cfg)
        self.rng = np.random.default_rng(0)
        self.ns_ids: Dict[Optional[str], int] = {None: 0}
        self.hash_of: Dict[int, int] = {}  # model key -> its hash
        self.ns_of: Dict[int, int] = {}  # model key -> its namespace id

    def keys(self, hashes, ns, put: bool = False) -> list:
        """The model's names of `hashes` in namespace `ns` (a put gives a new name its id)."""
        if ns not in self.ns_ids and put:
            self.ns_ids[ns] = len(self.ns_ids)
        i = self.ns_ids.get(ns, UNKNOWN_NS)
        out = []
        for h in hashes:
            k = fold(i, h)
            self.hash_of[k], self.ns_of[k] = h, i
            out.append(k)
        return out

    def query_keys(self, hashes, ns) -> list:
        """The model's names of `hashes` in `ns` for a get, lookup or match (the remote variant
        gives a new name its id there too)."""
        return self.keys(hashes, ns)

    def teardown(self) -> None:
        if hasattr(self, "m"):
            self.m.close()
            assert os.listdir(self.dir) == []
            shutil.rmtree(self.dir)

    @rule(hashes=hash_lists, ns=namespaces)
    def put(self, hashes, ns) -> None:
        src = self.rng.integers(0, 256, size=len(hashes) * self.bs, dtype=np.uint8)
        blocks = [src[i * self.bs:(i + 1) * self.bs].tobytes() for i in range(len(hashes))]
        new = self.m.put(np.array(hashes, dtype=np.uint64), src, namespace=ns)
        assert new == self.expect_put(self.keys(hashes, ns, put=True), blocks)

    # What the model expects; the remote variant below adds its tier.
    def expect_put(self, hashes, blocks) -> int:
        return self.model.put(hashes, blocks)

    def expect_get(self, hashes) -> list:
        return self.model.get(hashes)

    def expect_match(self, hashes) -> int:
        return self.model.match(hashes)

    def expect_lookup(self, hashes) -> "tuple[int, int]":
        return self.model.lookup(hashes)

    @rule(hashes=hash_lists, ns=namespaces)
    def get(self, hashes, ns) -> None:
        dst = np.zeros(len(hashes) * self.bs, dtype=np.uint8)
        n = self.m.get(hashes, dst, namespace=ns)
        want = self.expect_get(self.query_keys(hashes, ns))
        assert n == len(want)
        for i, b in enumerate(want):
            assert dst[i * self.bs:(i + 1) * self.bs].tobytes() == b, f"block {hashes[i]}"

    @rule(hashes=hash_lists, ns=namespaces)
    def match(self, hashes, ns) -> None:
        assert self.m.match(hashes, namespace=ns) == self.expect_match(self.query_keys(hashes, ns))

    @rule(put_hashes=hash_lists, extra=hash_lists, reverse=st.booleans(), ns=namespaces)
    def jobs(self, put_hashes, extra, reverse, ns) -> None:
        # A put job and a get job submitted back to back, waited for in either order. The get
        # includes a hash of the put, so it waits for the put: the order is defined, and the
        # model applies put then get.
        get_hashes = [put_hashes[0]] + extra
        src = self.rng.integers(0, 256, size=len(put_hashes) * self.bs, dtype=np.uint8)
        blocks = [src[i * self.bs:(i + 1) * self.bs].tobytes() for i in range(len(put_hashes))]
        dst = np.zeros(len(get_hashes) * self.bs, dtype=np.uint8)
        put_job = self.m.put_async(put_hashes, src, namespace=ns)
        get_job = self.m.get_async(get_hashes, dst, namespace=ns)
        if reverse:
            n = get_job.wait(timeout=60)
            new = put_job.wait(timeout=60)
        else:
            new = put_job.wait(timeout=60)
            n = get_job.wait(timeout=60)
        assert new == self.expect_put(self.keys(put_hashes, ns, put=True), blocks)
        want = self.expect_get(self.query_keys(get_hashes, ns))
        assert n == len(want)
        for i, b in enumerate(want):
            assert dst[i * self.bs:(i + 1) * self.bs].tobytes() == b, f"job block {get_hashes[i]}"

    @rule(hashes=hash_lists, ns=namespaces)
    def lookup(self, hashes, ns) -> None:
        if not hasattr(self, "leases"):
            self.leases = {}
        lease = self.m.lookup(hashes, namespace=ns)
        mid, n = self.expect_lookup(self.query_keys(hashes, ns))
        assert lease.count == n
        self.leases[mid] = (lease, self.keys(hashes[:n], ns))

    @rule(data=st.data())
    def use_or_release_a_lease(self, data) -> None:
        if not getattr(self, "leases", None):
            return
        mid = data.draw(st.sampled_from(sorted(self.leases)))
        lease, hashes = self.leases.pop(mid)
        if data.draw(st.booleans()):
            lease.release()
            self.model.release(mid)
            return
        dst = np.zeros(len(hashes) * self.bs, dtype=np.uint8)
        n = self.m.get(lease, dst)
        want = self.model.get_lease(mid, hashes)
        assert n == len(want)
        for i, b in enumerate(want):
            assert dst[i * self.bs:(i + 1) * self.bs].tobytes() == b, f"leased block {hashes[i]}"

    @rule(hashes=hash_lists, ns=namespaces)
    def touch(self, hashes, ns) -> None:
        want = 0
        for k in self.keys(hashes, ns):
            if self.model.present(k):
                self.model.touch(k)
                want += 1
        assert self.m.touch(hashes, namespace=ns) == want

    @rule(hashes=hash_lists, ns=namespaces)
    def remove(self, hashes, ns) -> None:
        assert self.m.remove(hashes, namespace=ns) == self.model.remove(self.keys(hashes, ns))

    @rule(ns=st.sampled_from(["a", "b"]), host=st.sampled_from([None, 1, 2]),
          disk=st.sampled_from([None, 1, 2]))
    def set_quota(self, ns, host, disk) -> None:
        self.m.set_quota(ns, host_bytes=None if host is None else host * self.bs,
                         disk_bytes=None if disk is None else disk * self.bs + self.bs // 2)
        self.keys([], ns, put=True)  # a quota gives a new name its id too
        self.model.set_quota(self.ns_ids[ns], host, disk)
        part = self.m.stats(namespace=ns)
        assert (part["host_quota_bytes"], part["disk_quota_bytes"]) == (
            None if host is None else host * self.bs, None if disk is None else disk * self.bs + self.bs // 2)

    @rule(ns=st.sampled_from(["a", "b"]))
    def purge(self, ns) -> None:
        # Every block of the namespace, in every tier; the others stay.
        mine = [k for k in self.model.data if self.ns_of[k] == self.ns_ids.get(ns, UNKNOWN_NS)]
        assert self.m.purge(ns) == self.model.remove(mine)

    @invariant()
    def same_state(self) -> None:
        if not hasattr(self, "m"):
            return
        host, disk = self.m.lru_order()
        assert host == [self.hash_of[k] for k in self.model.host]
        assert disk == [self.hash_of[k] for k in self.model.disk]
        assert len(self.m) == len(self.model.data)
        s = self.m.stats()
        assert s["host_blocks_used"] <= self.model.H and s["disk_blocks_used"] <= self.model.D
        assert s["dropped_blocks"] == self.model.dropped
        assert s["disk_not_admitted"] == self.model.not_admitted
        assert s["rejected_full"] == self.model.rejected
        for h in range(13):
            assert (h in self.m) == self.model.present(h)
        for ns in ("a", "b"):
            i = self.ns_ids.get(ns, UNKNOWN_NS)
            for h in range(13):
                assert self.m.contains(h, namespace=ns) == self.model.present(fold(i, h)), (ns, h)
            part = self.m.stats(namespace=ns)
            assert part["host_blocks_used"] == sum(1 for k in self.model.host if self.ns_of[k] == i)
            assert part["disk_blocks_used"] == sum(1 for k in self.model.disk if self.ns_of[k] == i)
        assert self.m.namespaces() == [n for n in self.ns_ids if n is not None]


ManagerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestManagerModel = ManagerMachine.TestCase


# --- the same model with a remote tier below (a real redis-server) -----------------------

_REDIS: "Dict[str, Server]" = {}


def _redis() -> "Server":
    """One redis-server for this module's remote machines (hypothesis state machines take no
    fixtures), stopped when the interpreter exits."""
    if "server" not in _REDIS:
        import atexit

        d = Path(tempfile.mkdtemp(prefix="dynblock-redis-"))
        _REDIS["server"] = server = Server(d, [])
        atexit.register(lambda: (server.stop(), shutil.rmtree(d, ignore_errors=True)))
    return _REDIS["server"]


class RemoteManagerMachine(ManagerMachine):
    """Every rule of the local model, with a remote tier below: an unbounded tier (written
    synchronously) that may lose entries at any time, holding every namespace's blocks apart.
    Gets, lookups and matches continue the local prefix from it (and give a name they meet its
    id, as a put does); what a get or lookup fetches is stored locally by the same policy as a
    put (and not sent back); a put sends the blocks new to the local tiers."""

    @initialize(
        caps=st.sampled_from([(0, 3), (1, 0), (2, 0), (1, 1), (2, 3), (3, 2)]),
        block_size=st.sampled_from([512, 4096]),
        o_direct=st.booleans(),
    )
    def setup(self, caps, block_size, o_direct) -> None:
        import uuid

        self.remote: Dict[int, bytes] = {}
        self.prefix = f"model-{uuid.uuid4().hex[:12]}"
        self.redis = _redis()
        self.open(caps, block_size, o_direct, remote=f"redis://127.0.0.1:{self.redis.port}",
                  remote_prefix=self.prefix, remote_write="sync", remote_timeout_ms=5000)

    def query_keys(self, hashes, ns) -> list:
        return self.keys(hashes, ns, put=True)

    def _continue(self, hashes, n) -> list:
        out = []
        for h in hashes[n:]:
            if h not in self.remote:
                break
            out.append(h)
        return out

    def expect_put(self, hashes, blocks) -> int:
        sent: list = []
        new = self.model.put(hashes, blocks, sent)
        # In order: a hash sent twice keeps its last bytes.
        self.remote.update(sent)
        return new

    def expect_get(self, hashes) -> list:
        local = self.model.get(hashes)
        more = self._continue(hashes, len(local))
        got = [self.remote[h] for h in more]
        self.model.put(more, got)  # kept in the local tiers, not sent back
        return local + got

    def expect_match(self, hashes) -> int:
        n = self.model.match(hashes)
        return n + len(self._continue(hashes, n))

    def expect_lookup(self, hashes) -> "tuple[int, int]":
        mid, n = self.model.lookup(hashes)
        more = self._continue(hashes, n)
        if not more:
            return mid, n
        self.model.put(more, [self.remote[h] for h in more])
        mid2, n2 = self.model.lookup(hashes)  # the whole prefix, pinned before the old pins go
        self.model.release(mid)
        return mid2, n2

    @rule(data=st.data())
    def remote_loses_entries(self, data) -> None:
        # The shared namespace's entries (a named one's keys carry a tag derived in Rust).
        shared = sorted(k for k in self.remote if self.ns_of[k] == 0)
        if not shared:
            return
        gone = data.draw(st.lists(st.sampled_from(shared), min_size=1, max_size=4))
        self.redis.cli("DEL", *[f"{self.prefix}:{0:016x}:{self.bs}:{h:016x}" for h in gone])
        for h in gone:
            self.remote.pop(h, None)


if shutil.which("redis-server") and shutil.which("redis-cli"):
    RemoteManagerMachine.TestCase.settings = settings(
        max_examples=30, stateful_step_count=20, deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    TestRemoteManagerModel = RemoteManagerMachine.TestCase
else:
    def test_remote_manager_model() -> None:
        pytest.skip("redis-server/redis-cli are not installed (apt-get install redis-server "
                    "redis-tools)")


# --- concrete behaviour -------------------------------------------------------

def block_for(h: int, bs: int) -> np.ndarray:
    return np.random.default_rng(h).integers(0, 256, size=bs, dtype=np.uint8)


def make(tmp_path: Path, h: int, d: int, bs: int = 4096, **kw) -> BlockManager:
    # These tests pin down the synchronous policy: write-behind (background) is off unless asked.
    kw.setdefault("write_behind", False)
    return BlockManager(Config(block_size=bs, host_blocks=h, disk_blocks=d, disk_dir=str(tmp_path),
                               numa_node=None, pin=False, **kw))


def test_tiers_alone_and_together(tmp_path: Path) -> None:
    bs = 8192
    for h, d in [(4, 0), (0, 4), (2, 4)]:
        with make(tmp_path, h, d, bs) as m:
            hashes = [11, 22, 33, 44]
            src = np.concatenate([block_for(x, bs) for x in hashes])
            assert m.put(hashes, src) == 4
            assert m.put(hashes, src) == 0  # already stored
            assert m.match(hashes + [55]) == 4
            out = np.zeros_like(src)
            assert m.get(hashes, out) == 4 and np.array_equal(out, src)
            s = m.stats()
            assert (s["host"] is None) == (h == 0) and (s["disk"] is None) == (d == 0)
            assert s["put_new"] == 4 and s["put_blocks"] == 8
    assert os.listdir(tmp_path) == []


def test_stats_report_tier_modes(tmp_path: Path) -> None:
    with make(tmp_path, 2, 4) as m:
        s = m.stats()
        assert s["disk"]["o_direct"] in (True, False) and "fallback_reason" in s["disk"]
        assert s["host"]["pinned"] is False and s["host"]["numa_node"] is None
        for k in ("host_hits", "disk_hits", "misses", "offloaded_bytes", "onboarded_bytes",
                  "host_evictions", "disk_evictions"):
            assert s[k] == 0


def test_promotion_that_evicts_its_own_disk_copy_keeps_the_block(tmp_path: Path) -> None:
    # host 1, disk 1: promoting 0 offloads 1, which pushes 0's disk copy out.
    bs = 4096
    with make(tmp_path, 1, 1, bs) as m:
        m.put([0, 1], np.concatenate([block_for(0, bs), block_for(1, bs)]))
        assert m.lru_order() == ([1], [0])
        out = np.zeros(bs, np.uint8)
        assert m.get([0], out) == 1 and np.array_equal(out, block_for(0, bs))
        assert m.lru_order() == ([0], [1])
        assert len(m) == 2 and m.stats()["dropped_blocks"] == 0
        assert m.get([1], out) == 1 and np.array_equal(out, block_for(1, bs))
        assert m.get([0], out) == 1 and np.array_equal(out, block_for(0, bs))


def test_get_prefix_stops_at_first_miss(tmp_path: Path) -> None:
    bs = 4096
    with make(tmp_path, 4, 4, bs) as m:
        m.put([1, 2, 4], np.concatenate([block_for(x, bs) for x in (1, 2, 4)]))
        out = np.zeros(4 * bs, dtype=np.uint8)
        assert m.get([1, 2, 3, 4], out) == 2
        assert m.stats()["misses"] == 2
        assert m.get([9], np.zeros(bs, np.uint8)) == 0


def test_remove_clear_contains(tmp_path: Path) -> None:
    with make(tmp_path, 2, 2) as m:
        m.put([1, 2, 3], np.zeros(3 * 4096, np.uint8))
        assert m.contains(1) and 3 in m and 7 not in m and len(m) == 3
        assert m.remove([1, 7]) == 1 and len(m) == 2
        m.clear()
        assert len(m) == 0 and m.match([2, 3]) == 0
        assert m.stats()["host_blocks_used"] == 0


def test_bad_input_changes_nothing(tmp_path: Path) -> None:
    bs = 4096
    with make(tmp_path, 2, 2, bs) as m:
        m.put([1], block_for(1, bs))
        before = m.lru_order()
        with pytest.raises(ValueError, match="need exactly 8192"):
            m.put([2, 3], np.zeros(bs, np.uint8))
        with pytest.raises(ValueError, match=r"hashes\[0\]"):
            m.put([-1], np.zeros(bs, np.uint8))
        with pytest.raises(ValueError, match=r"hashes\[1\]"):
            m.put([5, 2**64], np.zeros(2 * bs, np.uint8))
        with pytest.raises(BufferError, match="read-only"):
            m.get([1], bytes(bs))
        with pytest.raises(TypeError, match="hashes"):
            m.match("abc")
        with pytest.raises(ValueError, match="hash must be"):
            m.contains(-5)
        assert m.lru_order() == before and len(m) == 1
        assert m.stats()["put_blocks"] == 1
    with pytest.raises(ValueError, match="closed"):
        m.put([1], block_for(1, bs))


def test_hashes_use_the_full_64_bit_range(tmp_path: Path) -> None:
    bs = 4096
    with make(tmp_path, 1, 2, bs) as m:
        hs = np.array([2**64 - 1, 0, 2**63], dtype=np.uint64)
        src = np.concatenate([block_for(i, bs) for i in range(3)])
        assert m.put(hs, src) == 3
        out = np.zeros_like(src)
        assert m.get(hs, out) == 3 and np.array_equal(out, src)
        assert (2**64 - 1) in m


def test_threads_do_not_corrupt_or_deadlock(tmp_path: Path) -> None:
    bs = 4096
    m = make(tmp_path, 8, 24, bs, io_depth=4)
    errors: List[str] = []
    universe = 40

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(150):
                hs = [int(x) for x in rng.integers(0, universe, size=rng.integers(1, 6))]
                if rng.random() < 0.5:
                    m.put(hs, np.concatenate([block_for(h, bs) for h in hs]))
                else:
                    out = np.zeros(len(hs) * bs, np.uint8)
                    n = m.get(hs, out)
                    for i in range(n):
                        if not np.array_equal(out[i * bs:(i + 1) * bs], block_for(hs[i], bs)):
                            errors.append(f"wrong bytes for block {hs[i]}")
                    m.match(hs)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "deadlock: a thread did not finish"
    assert errors == []
    s = m.stats()
    assert s["host_blocks_used"] <= 8 and s["disk_blocks_used"] <= 24
    m.close()


def test_failed_offload_registers_nothing(tiny_tmpfs: Path) -> None:
    """ENOSPC while evicting to a sparse disk tier: the put fails cleanly,
    nothing half-registered, and the manager keeps serving."""
    bs = 1 << 20
    cfg = Config(block_size=bs, host_blocks=2, disk_blocks=12, disk_dir=str(tiny_tmpfs),
                 numa_node=None, pin=False, preallocate="sparse", write_behind=False)
    m = BlockManager(cfg)
    m.put([1, 2], np.concatenate([block_for(1, bs), block_for(2, bs)]))
    filler = fill_up(tiny_tmpfs)
    with pytest.raises(OSError) as ei:
        m.put([3, 4], np.concatenate([block_for(3, bs), block_for(4, bs)]))
    assert ei.value.errno == 28  # ENOSPC
    # 3 and 4 not stored; 1 and 2 (the victims whose offload failed) are gone,
    # never registered on disk with bytes that are not there.
    for h in (1, 2, 3, 4):
        assert h not in m
    assert m.stats()["failed_writes"] >= 1
    filler.unlink()
    m.put([5], block_for(5, bs))
    out = np.zeros(bs, np.uint8)
    assert m.get([5], out) == 1 and np.array_equal(out, block_for(5, bs))
    m.close()


def test_touch_keeps_a_block_from_eviction() -> None:
    cfg = Config(block_size=512, host_blocks=2, numa_node=None, pin=False)
    with BlockManager(cfg) as m:
        m.put([1, 2], np.zeros(1024, dtype=np.uint8))
        assert m.touch([1, 99]) == 1  # 99 is not stored
        m.put([3], np.zeros(512, dtype=np.uint8))  # evicts the least recent: 2, not 1
        assert 1 in m and 2 not in m and 3 in m
        with pytest.raises(ValueError, match=r"hashes\[0\] must be an integer"):
            m.touch(["x"])


def test_a_get_whose_promotions_overflow_the_disk_tier_loses_no_block(tmp_path: Path) -> None:
    # Host 2 + disk 5 slots, 6 blocks. A get of disk-only blocks (with repeats) promotes them
    # one by one; each promotion offloads a host-only block into the full disk tier, which pushes
    # out a disk-only block that this very get has read and will promote later. Found by the
    # model test: that block must be promoted from the caller's buffer, not lost.
    cfg = Config(block_size=512, host_blocks=2, disk_blocks=5, disk_dir=str(tmp_path),
                 numa_node=None, pin=False, write_behind=False)
    with BlockManager(cfg) as m:
        data = np.random.default_rng(0).integers(0, 256, 6 * 512, dtype=np.uint8)
        hs = [0, 1, 3, 5, 2, 4]
        m.put(hs, data)
        out = np.zeros(6 * 512, np.uint8)
        assert m.get([0, 1, 3, 5, 3, 1], out) == 6
        assert all(h in m for h in hs), m.lru_order()
        back = np.zeros(6 * 512, np.uint8)
        assert m.get(hs, back) == 6 and np.array_equal(back, data)


# --- fork -------------------------------------------------------------------


def test_a_forked_child_gets_a_clear_error_and_the_parent_is_unharmed(tmp_path: Path) -> None:
    r = run_py(f"""
        import multiprocessing
        cfg = dynblock.Config(block_size=1 << 20, host_blocks=8, disk_blocks=32, disk_dir={str(tmp_path)!r},
                              numa_node=None, pin=False)
        kv = dynblock.BlockManager(cfg)
        src = np.arange(4 << 20, dtype=np.uint64).astype(np.uint8)
        kv.put(list(range(4)), src)
        pid = os.fork()
        if pid == 0:
            try:
                kv.get(list(range(4)), np.empty(4 << 20, np.uint8))
                os._exit(3)
            except dynblock.ForkError as e:
                os._exit(0 if "spawn" in str(e) and "after forking" in str(e) else 4)
            except BaseException:
                os._exit(5)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, os.waitstatus_to_exitcode(status)

        def use_store(_):
            try:
                kv.put([99], np.zeros(1 << 20, np.uint8))
                return "stored"
            except dynblock.ForkError:
                return "ForkError"
        with multiprocessing.get_context("fork").Pool(1) as pool:
            assert pool.map(use_store, [0]) == ["ForkError"]
        out = np.zeros(4 << 20, np.uint8)
        assert kv.get(list(range(4)), out) == 4 and np.array_equal(out, src)
        assert 99 not in kv
        print("ok")
    """, timeout=60)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_a_forked_child_cannot_touch_a_persistent_store(tmp_path: Path) -> None:
    path = str(tmp_path / "kv.bin")
    # The parent keeps its lock while the child exits: run it as a background process.
    code = PRELUDE + textwrap.dedent(f"""
        kv = open_store({path!r})
        kv.put([1, 2], np.concatenate([data_for(1), data_for(2)]))
        pid = os.fork()
        if pid == 0:
            codes = 0
            for call in (lambda: kv.put([50], data_for(50)), lambda: kv.sync(), lambda: len(kv)):
                try:
                    call()
                except dynblock.ForkError:
                    codes += 1
            kv.close()
            os._exit(0 if codes == 3 else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        kv.put([3], data_for(3))
        print("ok", flush=True)
        sys.stdin.read()
        kv.close()
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        ready, _, _ = select.select([p.stdout], [], [], 60)  # a hung child must not hang the test
        assert ready, "the parent did not report within 60 s (a fork deadlock?)"
        assert p.stdout.readline().strip() == "ok"
        with pytest.raises(dynblock.StoreLockedError, match="another process"):
            open_store(Path(path))  # the child's exit left the parent's lock in place
        out, err = p.communicate("", timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)
    assert p.returncode == 0, err
    with open_store(Path(path)) as m:
        assert sorted(h for h in (1, 2, 3, 50) if h in m) == [1, 2, 3]
        assert all(np.array_equal(get_one(m, h), data_for(h)) for h in (1, 2, 3))


# --- destinations that do not expose their memory ----------------------------------


def test_a_destination_with_only_array_is_refused(tmp_path: Path) -> None:
    class CopyingDst:
        def __init__(self) -> None:
            self.a = np.zeros(BS, np.uint8)

        def __array__(self, dtype=None, copy=None):
            return self.a.copy()

    class SharingDst:  # exposes its memory through the array interface: fine
        def __init__(self) -> None:
            self.a = np.zeros(BS, np.uint8)
            self.__array_interface__ = self.a.__array_interface__

    with BlockManager(Config(block_size=BS, host_blocks=4, numa_node=None, pin=False)) as kv:
        kv.put([1], np.full(BS, 9, np.uint8))
        d = CopyingDst()
        with pytest.raises(TypeError, match="does not expose its memory"):
            kv.get([1], d)
        assert not d.a.any()
        s = SharingDst()
        assert kv.get([1], s) == 1 and (s.a == 9).all()


# --- doctor, closed managers, odd inputs ---------------------------------------------


def test_a_closed_manager_answers_nothing(tmp_path: Path) -> None:
    kv = BlockManager(Config(block_size=BS, host_blocks=2, numa_node=None, pin=False))
    kv.put([1], data_for(1))
    kv.close()
    for call in (lambda: len(kv), lambda: 1 in kv, kv.stats, kv.lru_order, lambda: kv.match([1]),
                 lambda: kv.get([1], np.zeros(BS, np.uint8))):
        with pytest.raises(ValueError, match="BlockManager is closed"):
            call()
    assert "closed" in repr(kv)


@pytest.mark.parametrize("hashes", [bytearray(b"\x01\x02"), {1, 2}, {1: 2}, frozenset([1])])
def test_unordered_or_byte_hash_lists_are_refused(hashes) -> None:
    with BlockManager(Config(block_size=BS, host_blocks=2, numa_node=None, pin=False)) as kv:
        with pytest.raises(TypeError, match="hashes"):
            kv.put(hashes, np.zeros(2 * BS, np.uint8))


def test_ctypes_arrays_are_buffers_too() -> None:
    import ctypes

    with BlockManager(Config(block_size=BS, host_blocks=2, numa_node=None, pin=False)) as kv:
        src = (ctypes.c_uint8 * BS)(*([7] * BS))
        assert kv.put([1], src) == 1
        dst = (ctypes.c_uint8 * BS)()
        assert kv.get([1], dst) == 1 and bytes(dst) == bytes(src)


def test_a_huge_hash_range_is_refused_before_it_is_listed() -> None:
    with BlockManager(Config(block_size=BS, host_blocks=2, numa_node=None, pin=False)) as kv:
        # Listing 2**40 hashes would take TiBs of memory: the size check comes first.
        with pytest.raises(ValueError, match="need exactly"):
            kv.get(range(2**40), np.zeros(BS, np.uint8))


def test_host_alignment_above_a_huge_page_is_honoured() -> None:
    h = HostStorage(4, 4 << 20, numa_node=None, pin=False, alignment=16 << 20)
    try:
        assert h._h.data_ptr % (16 << 20) == 0
        assert h.slot_stride % (16 << 20) == 0
    finally:
        h.close()


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_s3fifo_keeps_reused_blocks_through_a_scan_that_pushes_them_out_of_lru(
        tmp_path: Path, tier: str) -> None:
    """A tier of 100 blocks, 20 of them asked for again, then a scan of 200
    one-off blocks: S3-FIFO keeps all 20, LRU none."""
    bs = 4096
    src = np.arange(200 * bs, dtype=np.uint32).view(np.uint8)[:200 * bs]
    kept = {}
    for eviction in ("lru", "s3fifo"):
        caps = (100, 0) if tier == "host" else (0, 100)
        with make(tmp_path, *caps, bs, **{f"{tier}_eviction": eviction}) as m:
            assert m.put(np.arange(100, dtype=np.uint64), src[:100 * bs]) == 100
            assert m.touch(list(range(20))) == 20
            assert m.put(np.arange(1000, 1200, dtype=np.uint64), src) == 200
            kept[eviction] = [h for h in range(20) if h in m]
            dst = np.zeros(len(kept[eviction]) * bs, np.uint8)
            assert m.get(kept[eviction], dst) == len(kept[eviction])
            assert all(dst[i * bs:(i + 1) * bs].tobytes() == src[h * bs:(h + 1) * bs].tobytes()
                       for i, h in enumerate(kept[eviction]))
            host, disk = m.lru_order()
            assert len(host if tier == "host" else disk) == 100
    assert kept == {"lru": [], "s3fifo": list(range(20))}


def test_a_persistent_s3fifo_disk_tier_recovers_its_blocks_into_its_queues(tmp_path: Path) -> None:
    kept = {}
    for eviction in ("lru", "s3fifo"):
        path = tmp_path / eviction
        with open_store(path, disk_blocks=8, disk_eviction=eviction) as m:
            m.put(list(range(8)), np.concatenate([data_for(h) for h in range(8)]))
        with open_store(path, disk_blocks=8, disk_eviction=eviction) as m:
            assert sorted(m.lru_order()[1]) == list(range(8))
            assert all(h in m for h in range(8))
            assert all(get_one(m, h).tobytes() == data_for(h).tobytes() for h in (0, 1))
            # S3-FIFO: the recovered blocks are in the small queue; 0 and 1 were asked for
            # again, so 8 new blocks move them to the main queue and push out the other six
            # and two of their own. LRU: 8 new blocks push out all 8.
            m.put(list(range(100, 108)), np.concatenate([data_for(h) for h in range(100, 108)]))
            kept[eviction] = [h for h in range(8) if h in m]
    assert kept == {"lru": [], "s3fifo": [0, 1]}


def run_then_end(code: str, end: str) -> None:
    """Run ``code`` (which opened a store as ``m``) in a fresh interpreter, then end it: a
    clean ``m.close()`` (``end == "close"``) or ``kill -9`` once the code has run."""
    tail = ("\nm.close()\n" if end == "close" else
            "\nprint('ready', flush=True)\nimport time\ntime.sleep(60)\n")
    full = textwrap.dedent(code) + tail
    if end == "close":
        r = run_py(full)
        assert r.returncode == 0, r.stderr
        return
    p = subprocess.Popen([sys.executable, "-c", PRELUDE + full], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    p.kill()
    p.wait(timeout=30)


@pytest.mark.parametrize("eviction", ["lru", "s3fifo"])
@pytest.mark.parametrize("end", ["close", "kill"])
def test_a_persistent_disk_tier_keeps_its_order_across_a_restart(
        tmp_path: Path, eviction: str, end: str) -> None:
    """Blocks 0-7 fill a disk tier of 8; 0 and 1 are asked for again, then block 100
    is put (its index write carries the order's changes; 2 leaves). After a clean close or
    kill -9, five new blocks push out the five least worth keeping: 3-7 (LRU: 0 and 1
    were used recently; S3-FIFO: they moved to the main queue). Were the order lost
    (every block back in write order, no count), 0 and 1 would be the first to go."""
    path = tmp_path / "store"
    code = f"""
        m = open_store({str(path)!r}, disk_blocks=8, disk_eviction={eviction!r})
        m.put(list(range(8)), np.concatenate([data_for(h) for h in range(8)]))
        out = np.zeros(BS, np.uint8)
        for h in (0, 1):
            assert m.get([h], out) == 1 and out.tobytes() == data_for(h).tobytes()
        m.put([100], data_for(100))
        assert 2 not in m and all(h in m for h in (0, 1, 3, 4, 5, 6, 7, 100))
    """
    run_then_end(code, end)
    with open_store(path, disk_blocks=8, disk_eviction=eviction) as m:
        m.put(list(range(101, 106)), np.concatenate([data_for(h) for h in range(101, 106)]))
        kept = sorted(h for h in [*range(8), *range(100, 106)] if h in m)
        assert kept == [0, 1, 100, 101, 102, 103, 104, 105]
        assert all(get_one(m, h).tobytes() == data_for(h).tobytes() for h in kept)


def test_reuse_admission_spares_the_disk_blocks_nobody_asked_for_twice(tmp_path: Path) -> None:
    # Host 2, disk 8: blocks 1-4 go through the host tier; only 2 is asked for again there.
    with make(tmp_path, 2, 8, disk_admission="reuse") as m:
        for h in (1, 2):
            m.put([h], block_for(h, 4096))
        assert m.touch([2]) == 1
        m.put([3], block_for(3, 4096))  # evicts 1 (never asked again): not written
        m.put([4], block_for(4, 4096))  # evicts 2 (touched): written to disk
        s = m.stats()
        assert (s["disk_not_admitted"], s["offloaded_blocks"], s["disk_blocks_used"]) == (1, 1, 1)
        assert 1 not in m and 2 in m and np.array_equal(get_one(m, 2), block_for(2, 4096))
        m.put([1], block_for(1, 4096))  # 1 again: its second sighting, admitted when it leaves
        m.put([5, 6], np.concatenate([block_for(5, 4096), block_for(6, 4096)]))
        assert 1 in m and m.stats()["disk_not_admitted"] == 3  # 1 is on disk; 3 and 4 were not
    with make(tmp_path, 2, 8) as m:  # "all" (the default) writes every victim
        for h in (1, 2, 3, 4):
            m.put([h], block_for(h, 4096))
        assert m.stats()["disk_not_admitted"] == 0 and m.stats()["offloaded_blocks"] == 2


@pytest.mark.parametrize("end", ["close", "kill", "compact-kill"])
def test_what_admission_turned_away_is_remembered_across_a_restart(tmp_path: Path, end: str) -> None:
    """Blocks 1 and 2 are turned away (host 2, disk 8, never asked for again), then the
    process closes (which lets 3 and 4 go unwritten too: turned away as well) or dies by
    kill -9 (after a compaction, in one case). Reopened, the store knows 1 is on its
    second sighting: it is written to disk when it leaves."""
    path = tmp_path / "store"
    code = f"""
        m = open_store({str(path)!r}, disk_blocks=8, host_blocks=2, disk_admission="reuse")
        for h in (1, 2, 3, 4):
            m.put([h], data_for(h))
        assert m.stats()["disk_not_admitted"] == 2
        if {end!r} == "compact-kill":
            m._m.compact_index()  # what `python -m dynblock.store compact` runs
    """
    run_then_end(code, "close" if end == "close" else "kill")
    from dynblock.store import info as store_info

    assert store_info(str(path))["turned_away_remembered"] == (4 if end == "close" else 2)
    with open_store(path, disk_blocks=8, host_blocks=2, disk_admission="reuse") as m:
        assert 1 not in m and 2 not in m
        m.put([1], data_for(1))  # its second sighting: asked for, as the ghost says
        m.put([5, 6], np.concatenate([data_for(5), data_for(6)]))  # 1 leaves the host tier
        s = m.stats()
        # 1 was written: without the ghost it would have been turned away again.
        assert (s["offloaded_blocks"], s["disk_not_admitted"]) == (1, 0), s
        assert np.array_equal(get_one(m, 1), data_for(1))


def test_write_behind_and_a_closing_store_write_only_what_admission_admits(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with open_store(path, disk_blocks=8, host_blocks=4, disk_admission="reuse") as m:
        m.put([1, 2], blocks([1, 2]))
        assert m.get([1], np.zeros(BS, np.uint8)) == 1  # 1 is asked for again
        m.put([3, 4], blocks([3, 4]))  # the host tier, least recent first: 2 1 3 4
        m.flush()  # write-behind: the least recent half (2, 1), what admission admits (1)
        assert m.stats()["written_behind"] == 1
    with open_store(path, disk_blocks=8, host_blocks=4, disk_admission="reuse") as m:
        assert m.stats()["recovered_blocks"] == 1 and 1 in m and 2 not in m
        assert np.array_equal(get_one(m, 1), data_for(1))
