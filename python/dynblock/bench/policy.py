"""The bench's ``policy`` workload: how well the block manager's policy keeps
what will be asked for again, measured against the limit.

The shipped Mooncake traces (``conversation``, ``synthetic``) and
``conversation+scans`` (the conversation trace with a one-off document of 20-120
never-repeated blocks after every fourth request, seeded) are replayed through a
real :class:`~dynblock.BlockManager` with 4 KiB blocks (the policy does not
depend on the payload) at three capacities each: a host tier of 1%, 3% and 8%
of the trace's distinct blocks and a disk tier four times that. Every request
``match``es its blocks, ``get``s the stored prefix and ``put``s the rest, as in
the ``trace`` workload. Write-behind is off (it only moves disk writes earlier)
so every figure is deterministic; each configuration runs once.

For each trace and capacity it reports, per policy configuration (eviction /
``disk_admission``, where the eviction is one name for both tiers or
``host+disk``, e.g. ``lru+s3fifo``: ``host_eviction="lru"``,
``disk_eviction="s3fifo"``):

- the block hit rate (host and disk hits over all block references), and for
  each other eviction: its points over LRU's (``hit_vs_lru_points``) and the
  share of LRU's gap to Belady's optimum it closes (``gap_closed``);
- disk writes per disk hit (blocks written to disk, host victims and their
  offloads, over blocks read from disk: bytes written per byte of disk hits);
- Belady's offline optimum at the same total capacity (host + disk blocks):
  every reference served from a cache that always evicts the block used
  farthest in the future. It counts a block as a hit even when a block before
  it in its request missed, so it is an upper bound on any policy's hit rate.

Tenants (op ``tenants``, the conversation trace, the same three capacities,
LRU, ``disk_admission="all"``): tenant ``a`` replays the trace in its
namespace; after each request tenant ``flood`` puts ten times as many
never-repeated blocks in its own. ``quotas/alone`` replays ``a`` with no
flood, ``a`` holding a quota of 3/4 of each tier and ``flood`` the rest;
``quotas/flood`` adds the flood; ``shared/flood`` floods with no quotas and
``shared/alone`` is ``a`` alone with the whole store. ``vs_alone`` is a
flooded tenant's hit rate over the same store's without the flood.
"""

from __future__ import annotations

import heapq
import os
import random
import tempfile
from typing import Any, Dict, List, Literal, Optional, Tuple

from ..config import Config
from ..manager import BlockManager
from . import trace as trace_mod
from .common import Progress, Results

#: Host tier sizes, as fractions of a trace's distinct blocks.
CAPACITIES = (0.01, 0.03, 0.08)
#: Disk tier blocks per host tier block.
DISK_PER_HOST = 4
Admission = Literal["all", "reuse"]
Eviction = Literal["lru", "s3fifo"]
#: (host_eviction, disk_eviction, disk_admission) configurations; the first is
#: the baseline of every other.
CONFIGS: Tuple[Tuple[Eviction, Eviction, Admission], ...] = (
    ("lru", "lru", "all"), ("s3fifo", "s3fifo", "all"), ("lru", "s3fifo", "all"),
    ("lru", "lru", "reuse"))
#: Payload bytes per block: the policy sees hashes, not bytes.
BLOCK = 4096
SHIPPED = ("conversation", "synthetic")
SCANS = "conversation+scans"


def with_scans(requests: List[List[int]], every: int = 4, seed: int = 1) -> List[List[int]]:
    """``requests`` with a one-off document (20-120 blocks nobody asks for
    again, ids above every id of the trace) after every ``every``-th request."""
    rng = random.Random(seed)
    fresh = max((max(r) for r in requests if r), default=0) + 1
    out: List[List[int]] = []
    for i, r in enumerate(requests):
        out.append(r)
        if i % every == every - 1:
            n = rng.randint(20, 120)
            out.append(list(range(fresh, fresh + n)))
            fresh += n
    return out


def load(name: str) -> Optional[List[List[int]]]:
    """The block ids of each request of a shipped trace, or of
    ``conversation+scans``; None when the shipped trace is missing."""
    base = "conversation" if name == SCANS else name
    path = trace_mod.find_trace(base)
    if path is None:
        return None
    reqs = [r.hash_ids for r in trace_mod.load_trace(path)]
    return with_scans(reqs) if name == SCANS else reqs


def belady_hits(requests: List[List[int]], capacity: int) -> int:
    """Block hits of Belady's MIN over the requests' references in order, with
    ``capacity`` blocks: on a miss into a full cache, the block whose next use
    is farthest (or never) leaves. An upper bound (see the module docs)."""
    refs = [h for r in requests for h in r]
    never = len(refs)
    nxt = [never] * len(refs)
    last: Dict[int, int] = {}
    for i in range(len(refs) - 1, -1, -1):
        nxt[i] = last.get(refs[i], never)
        last[refs[i]] = i
    cached: Dict[int, int] = {}  # block -> its next use
    heap: List[Tuple[int, int]] = []  # (-next use, block); stale entries skipped
    hits = 0
    for i, h in enumerate(refs):
        if h in cached:
            hits += 1
        elif capacity <= 0:
            continue
        elif len(cached) >= capacity:
            while True:
                neg, v = heapq.heappop(heap)
                if cached.get(v) == -neg:
                    del cached[v]
                    break
        cached[h] = nxt[i]
        heapq.heappush(heap, (-nxt[i], h))
    return hits


def label(host_eviction: str, disk_eviction: str, admission: str) -> str:
    """A configuration's name in the table: ``lru/all``, ``lru+s3fifo/all``."""
    ev = host_eviction if host_eviction == disk_eviction else f"{host_eviction}+{disk_eviction}"
    return f"{ev}/{admission}"


def replay(requests: List[List[int]], host: int, disk: int, eviction: Tuple[Eviction, Eviction],
           admission: Admission, directory: str) -> Dict[str, Any]:
    """One replay through a real BlockManager whose tiers evict as
    ``eviction`` = (host, disk) says; its hit and write figures."""
    cfg = Config(block_size=BLOCK, host_blocks=host, disk_blocks=disk, disk_dir=directory,
                 o_direct=False, write_behind=False, numa_node=None, pin=False,
                 disk_admission=admission, host_eviction=eviction[0],
                 disk_eviction=eviction[1])
    reqs = [trace_mod.Request(0, 0, 0, r) for r in requests]
    with BlockManager(cfg) as m:
        r = trace_mod.replay(m, reqs)
        s = m.stats()
    written = s["offloaded_blocks"]
    return {
        "hit_rate": r.hit_rate,
        "host_hits": r.host_hits,
        "disk_hits": r.disk_hits,
        "disk_writes": written,
        "disk_writes_per_disk_hit": written / r.disk_hits if r.disk_hits else float("inf"),
        "disk_not_admitted": s["disk_not_admitted"],
        "seconds": r.seconds,
    }


def run_policy(res: Results, directory: str, progress: Progress,
               traces: Tuple[str, ...] = SHIPPED + (SCANS,),
               capacities: Tuple[float, ...] = CAPACITIES) -> None:
    loaded = [(name, load(name)) for name in traces]
    progress.add(sum(len(capacities) * (len(CONFIGS) + 1) for _, r in loaded if r))
    for name, reqs in loaded:
        if reqs is None:
            res.note(f"policy: the shipped trace {name!r} is missing from this installation; skipped")
            continue
        distinct = len({h for r in reqs for h in r})
        nrefs = sum(len(r) for r in reqs)
        for frac in capacities:
            host = max(1, int(distinct * frac))
            disk = DISK_PER_HOST * host
            optimum = belady_hits(reqs, host + disk) / nrefs
            progress.step(f"policy {name} belady")
            base: Optional[Dict[str, Any]] = None
            for host_ev, disk_ev, admission in CONFIGS:
                with tempfile.TemporaryDirectory(dir=directory) as d:
                    r = replay(reqs, host, disk, (host_ev, disk_ev), admission, d)
                impl = label(host_ev, disk_ev, admission)
                c = res.case("policy", impl, "replay", unit="hit rate",
                             trace=name, host_blocks=host, disk_blocks=disk)
                c.values.append(r["hit_rate"])
                c.extra = dict(r, belady=optimum, distinct_blocks=distinct, references=nrefs)
                c.ratios["of_belady"] = r["hit_rate"] / optimum if optimum else float("nan")
                if base is None:
                    base = r
                elif admission == "all":
                    # Another eviction against LRU, in points and as a share of LRU's gap.
                    c.ratios["hit_vs_lru_points"] = 100 * (r["hit_rate"] - base["hit_rate"])
                    gap = optimum - base["hit_rate"]
                    if gap > 0:
                        c.ratios["gap_closed"] = (r["hit_rate"] - base["hit_rate"]) / gap
                else:
                    if base["disk_writes_per_disk_hit"] not in (0.0, float("inf")):
                        c.ratios["writes_per_disk_hit_vs_all"] = (
                            r["disk_writes_per_disk_hit"] / base["disk_writes_per_disk_hit"])
                    # Points of hit rate, not a ratio (the key says so): the goal is >= -2.
                    c.ratios["hit_vs_all_points"] = 100 * (r["hit_rate"] - base["hit_rate"])
                progress.step(f"policy {name} {impl}")


#: Tenant ``a``'s share of each tier under quotas (``flood`` has the rest).
TENANT_SHARE = 0.75
#: Blocks the flooding tenant puts per block of tenant ``a``'s requests.
FLOOD = 10


def tenant_replay(requests: List[List[int]], host: int, disk: int, quotas: bool, flood: bool,
                  directory: str) -> Dict[str, Any]:
    """Tenant ``a`` replays ``requests``; with ``flood``, tenant ``flood`` puts
    FLOOD one-off blocks per block of each request after it; with
    ``quotas``, ``a`` holds TENANT_SHARE of each tier and ``flood`` the rest."""
    cfg = Config(block_size=BLOCK, host_blocks=host, disk_blocks=disk, disk_dir=directory,
                 o_direct=False, write_behind=False, numa_node=None, pin=False)
    reqs = [trace_mod.Request(0, 0, 0, r) for r in requests]
    with BlockManager(cfg) as m:
        if quotas:
            qa = (max(1, int(host * TENANT_SHARE)), max(1, int(disk * TENANT_SHARE)))
            m.set_quota("a", host_bytes=qa[0] * BLOCK, disk_bytes=qa[1] * BLOCK)
            m.set_quota("flood", host_bytes=max(1, host - qa[0]) * BLOCK,
                        disk_bytes=max(1, disk - qa[1]) * BLOCK)
        longest = FLOOD * max(len(r) for r in requests)
        src = bytearray(longest * BLOCK)
        nxt = 1 << 62  # the flood's next hash: each one is new

        def flood_after(r: trace_mod.Request) -> None:
            nonlocal nxt
            n = FLOOD * len(r.hash_ids)
            m.put(list(range(nxt, nxt + n)), memoryview(src)[:n * BLOCK], namespace="flood")
            nxt += n

        r = trace_mod.replay(m, reqs, namespace="a", after=flood_after if flood else None)
        f = m.stats(namespace="flood")
    return {"hit_rate": r.hit_rate, "host_hits": r.host_hits, "disk_hits": r.disk_hits,
            "flood_blocks": f["put_blocks"], "seconds": r.seconds}


def run_tenants(res: Results, directory: str, progress: Progress,
                capacities: Tuple[float, ...] = CAPACITIES) -> None:
    reqs = load("conversation")
    if reqs is None:
        res.note("policy: the shipped conversation trace is missing; the tenants cases are skipped")
        return
    distinct = len({h for r in reqs for h in r})
    progress.add(4 * len(capacities))
    for frac in capacities:
        host = max(4, int(distinct * frac))
        disk = DISK_PER_HOST * host
        got: Dict[str, Dict[str, Any]] = {}
        for quotas in (True, False):
            for flood in (False, True):
                impl = f"{'quotas' if quotas else 'shared'}/{'flood' if flood else 'alone'}"
                with tempfile.TemporaryDirectory(dir=directory) as d:
                    r = got[impl] = tenant_replay(reqs, host, disk, quotas, flood, d)
                c = res.case("policy", impl, "tenants", unit="hit rate", trace="conversation",
                             host_blocks=host, disk_blocks=disk)
                c.values.append(r["hit_rate"])
                c.extra = dict(r, tenant_share=TENANT_SHARE if quotas else None, flood_per_block=FLOOD)
                alone = got[impl.replace("flood", "alone")]["hit_rate"]
                if flood and alone:
                    c.ratios["vs_alone"] = r["hit_rate"] / alone
                progress.step(f"policy tenants {impl}")


def describe(extra: Dict[str, Any]) -> str:
    """The table's text for one policy case."""
    if "flood_blocks" in extra:
        return (f"tenant a hit {extra['hit_rate']:.1%} (host {extra['host_hits']}, disk "
                f"{extra['disk_hits']}), flood {extra['flood_blocks']} blocks")
    w = extra["disk_writes_per_disk_hit"]
    return (f"hit {extra['hit_rate']:.1%} (belady {extra['belady']:.1%}), disk writes per disk hit "
            f"{w:.2f}, not admitted {extra['disk_not_admitted']}")


def write_plot(res: Results, path: str) -> Optional[str]:
    """Hit rate by capacity per trace (each configuration and Belady's
    optimum) beside disk writes per disk hit; written next to ``path`` as
    ``<stem>-policy.png``. Returns the file, or None without policy cases."""
    cases = [c for c in res.cases if c.workload == "policy" and c.op == "replay" and c.values]
    if not cases:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(c.params["trace"] for c in cases))
    fig, axes = plt.subplots(2, len(names), figsize=(5 * len(names), 8), squeeze=False)
    for col, name in enumerate(names):
        mine = [c for c in cases if c.params["trace"] == name]
        for impl in dict.fromkeys(c.impl for c in mine):
            pts = sorted((c.params["host_blocks"], c.median, c.extra["disk_writes_per_disk_hit"])
                         for c in mine if c.impl == impl)
            axes[0][col].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=impl)
            axes[1][col].plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=impl)
        opt = sorted({(c.params["host_blocks"], c.extra["belady"]) for c in mine})
        axes[0][col].plot([p[0] for p in opt], [p[1] for p in opt], "k--", label="Belady (bound)")
        axes[0][col].set_title(name)
        axes[0][col].set_ylabel("block hit rate")
        axes[1][col].set_ylabel("disk writes per disk hit")
        for row in (0, 1):
            axes[row][col].set_xlabel(f"host tier blocks (disk: {DISK_PER_HOST}x)")
            axes[row][col].grid(True, alpha=0.3)
            axes[row][col].legend(fontsize=8)
    fig.tight_layout()
    stem, _ = os.path.splitext(path)
    out = stem + "-policy.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
