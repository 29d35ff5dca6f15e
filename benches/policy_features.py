"""How far an online eviction policy can get on a request trace, measured from
the trace itself.

For a Mooncake-style trace (JSON lines with `hash_ids`), prints:

- how predictable reuse is: the share of blocks ever used again, and for
  each request the chance that a later request reuses its new blocks, by
  how many requests of its chain came before it (the conversation's turn)
  and by its length;
- block hit rates in one cache of C blocks (no tiers, no prefix rule: every
  access of a cached block is a hit) for LRU, Belady's offline optimum and a
  family of online policies that keep LRU's order but give blocks seen
  before a head start of `bonus * C` accesses (and optionally send a
  request's last block, usually a partial one, to the cold end), with the
  best member's share of LRU's gap to Belady. The best member is chosen on
  the same trace it is scored on, so it overstates what such a policy would
  reach on unseen requests;
- disk admission in two LRU tiers (host H blocks, disk D; a request hits
  its longest cached prefix, a disk hit is copied back to the host tier, a
  host victim without a disk copy is written to disk if the rule admits
  it): hit rate and disk writes per disk hit for `all`, `reuse` (asked for
  again while in the host tier, or its second sighting), a rule that knows
  the future (the block is used again), and `reuse` plus the blocks of a
  request that continued a cached prefix (a later turn: at least 30% of its
  blocks hit). This model of the tiers gives the bench's `policy` figures
  for `all` and `reuse` within 0.1 points.

    python benches/policy_features.py [--trace PATH] [--capacity 9135,27415]
        [--tiers 1827:7308,5483:21932,14623:58492]

Without `--trace` the conversation trace shipped with the bench is used
(12,031 requests, about a minute per capacity here).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import heapq
import json
import os
from collections import OrderedDict
from typing import Callable, Dict, List, Tuple

import dynblock.bench
from dynblock.bench.policy import belady_hits


def load(path: str) -> List[List[int]]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return [json.loads(line)["hash_ids"] for line in f if line.strip()]


def predictability(reqs: List[List[int]]) -> None:
    uses: Dict[int, List[int]] = collections.defaultdict(list)
    for i, hs in enumerate(reqs):
        for h in hs:
            uses[h].append(i)
    total = sum(len(hs) for hs in reqs)
    again = sum(1 for u in uses.values() if len(u) > 1)
    print(f"{len(reqs)} requests, {total} block accesses, {len(uses)} distinct blocks; "
          f"infinite-cache hit rate {1 - len(uses) / total:.3f}")
    print(f"blocks used again: {again / len(uses):.3f}; a request's last block used again: "
          f"{sum(1 for hs in reqs if len(uses[hs[-1]]) > 1) / len(reqs):.3f}")
    turn: Dict[int, int] = {}
    by_turn: Dict[int, List[int]] = collections.defaultdict(lambda: [0, 0])
    by_len: Dict[int, List[int]] = collections.defaultdict(lambda: [0, 0])
    for i, hs in enumerate(reqs):
        before = [h for h in hs[1:] if uses[h][0] < i]
        t = 1 + max((turn.get(h, 0) for h in before), default=0)
        new = [h for h in hs[:-1] if uses[h][0] == i]
        for h in hs:
            if uses[h][0] == i:
                turn[h] = t
        if not new:
            continue
        followed = any(len(uses[h]) > 1 for h in new)
        for table, key in ((by_turn, min(t, 8)), (by_len, min(len(hs) // 16, 4))):
            table[key][0] += 1
            table[key][1] += followed
    print("P(a later request reuses a request's new blocks), by turn (8: 8 or more):")
    print("   " + ", ".join(f"{k}: {f / n:.2f} of {n}" for k, (n, f) in sorted(by_turn.items())))
    print("   by length in blocks (16-block buckets, 64: 64 or more):")
    print("   " + ", ".join(f"{k * 16}: {f / n:.2f} of {n}" for k, (n, f) in sorted(by_len.items())))


def accesses(reqs: List[List[int]]) -> List[Tuple[int, bool]]:
    """Every block access in order, with whether it is its request's last block."""
    return [(h, j == len(hs) - 1) for hs in reqs for j, h in enumerate(hs)]


def keyed(acc: List[Tuple[int, bool]], cap: int, bonus: float, last_cold: bool) -> float:
    """LRU order by the time of the last access, plus `bonus` for a block seen
    before, minus `cap` for a request's last block when `last_cold`."""
    held: Dict[int, float] = {}
    count: Dict[int, int] = collections.Counter()
    heap: List[Tuple[float, int]] = []
    hits = 0
    for t, (h, last) in enumerate(acc):
        count[h] += 1
        if h in held:
            hits += 1
        elif len(held) >= cap:
            while True:
                k, b = heapq.heappop(heap)
                if held.get(b) == k:
                    del held[b]
                    break
        k = t + (bonus * cap if count[h] >= 2 else 0.0) - (cap if last and last_cold else 0.0)
        held[h] = k
        heapq.heappush(heap, (k, h))
    return hits / len(acc)


Rule = Callable[[int, bool, float, int], bool]


def admission(reqs: List[List[int]], host_cap: int, disk_cap: int, admit: Rule) -> Tuple[float, float]:
    """Hit rate and disk writes per disk hit of two LRU tiers whose host
    victims go to disk when ``admit(block, asked, share of its request that
    hit, request index)`` says so; a victim turned away is remembered
    (``host_cap + disk_cap`` of them) and counts as asked when put again."""
    host: "OrderedDict[int, Tuple[bool, float]]" = OrderedDict()
    disk: "OrderedDict[int, None]" = OrderedDict()
    ghost: "OrderedDict[int, None]" = OrderedDict()
    refs = hits = disk_hits = writes = 0

    def insert(h: int, asked: bool, share: float, i: int) -> None:
        nonlocal writes
        host[h] = (asked, share)
        while len(host) > host_cap:
            v, (a, sh) = host.popitem(last=False)
            if v in disk:
                continue
            if admit(v, a, sh, i):
                writes += 1
                disk[v] = None
                if len(disk) > disk_cap:
                    disk.popitem(last=False)
            else:
                ghost[v] = None
                if len(ghost) > host_cap + disk_cap:
                    ghost.popitem(last=False)

    for i, hs in enumerate(reqs):
        refs += len(hs)
        n = 0
        while n < len(hs) and (hs[n] in host or hs[n] in disk):
            n += 1
        share = n / len(hs)
        where = [h in host for h in hs[:n]]
        hits += n
        disk_hits += n - sum(where)
        for h, in_host in zip(hs[:n], where):
            if h in host:
                host[h] = (True, host[h][1])
                host.move_to_end(h)
            elif h in disk:
                disk.move_to_end(h)
                if not in_host:
                    insert(h, True, share, i)
        for h in hs[n:]:
            if h in host:
                host[h] = (True, host[h][1])
                host.move_to_end(h)
            else:
                second = h in ghost
                ghost.pop(h, None)
                insert(h, second, share, i)
    return hits / refs, writes / disk_hits if disk_hits else float("inf")


def admissions(reqs: List[List[int]], host_cap: int, disk_cap: int) -> None:
    last_use: Dict[int, int] = {}
    for i, hs in enumerate(reqs):
        for h in hs:
            last_use[h] = i
    rules: List[Tuple[str, Rule]] = [
        ("all", lambda h, asked, share, i: True),
        ("reuse", lambda h, asked, share, i: asked),
        ("used again (knows the future)", lambda h, asked, share, i: last_use[h] > i),
        ("reuse + blocks of a later turn", lambda h, asked, share, i: asked or share >= 0.3),
    ]
    print(f"admission, host {host_cap} blocks, disk {disk_cap}:")
    base = None
    for name, rule in rules:
        hit, wph = admission(reqs, host_cap, disk_cap, rule)
        base = base or (hit, wph)
        print(f"   {name}: hit {hit:.4f} ({100 * (hit - base[0]):+.2f} pts), disk writes per "
              f"disk hit {wph:.2f} ({wph / base[1]:.2f}x of all)")


def main() -> None:
    shipped = os.path.join(os.path.dirname(dynblock.bench.__file__), "traces",
                           "mooncake_conversation.jsonl.gz")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", default=shipped)
    ap.add_argument("--capacity", default="9135,27415",
                    help="comma-separated cache sizes in blocks (default: the policy "
                         "workload's host+disk at 1%% and 3%% of the conversation trace)")
    ap.add_argument("--tiers", default="1827:7308,5483:21932,14623:58492",
                    help="comma-separated HOST:DISK tier sizes in blocks for the admission "
                         "rules (default: the policy workload's three on this trace)")
    a = ap.parse_args()
    reqs = load(a.trace)
    print(f"trace {a.trace}")
    predictability(reqs)
    acc = accesses(reqs)
    for cap in (int(c) for c in a.capacity.split(",")):
        b, lru = belady_hits(reqs, cap) / len(acc), keyed(acc, cap, 0.0, False)
        print(f"capacity {cap}: Belady {b:.4f}, LRU {lru:.4f}")
        best = (lru, 0.0, False)
        for last_cold in (False, True):
            for bonus in (0.25, 0.5, 1.0, 2.0):
                x = keyed(acc, cap, bonus, last_cold)
                best = max(best, (x, bonus, last_cold))
                print(f"   seen before +{bonus} C, last block cold {last_cold}: {x:.4f} "
                      f"(gap closed {(x - lru) / (b - lru):+.3f})")
        x, bonus, last_cold = best
        print(f"   best on this trace: +{bonus} C, last block cold {last_cold}: "
              f"gap closed {(x - lru) / (b - lru):+.3f}")
    for tiers in a.tiers.split(","):
        host_cap, disk_cap = (int(x) for x in tiers.split(":"))
        admissions(reqs, host_cap, disk_cap)


if __name__ == "__main__":
    main()
