"""Prometheus metrics for anyone embedding dynblock: ``register(manager)`` adds a
collector to a ``prometheus_client`` registry (``pip install 'dynblock[metrics]'``)
that reads the manager's counters when the registry is scraped. Nothing is
recorded per call: a store with metrics costs what one without costs, and a
scrape costs one ``stats()``.

Every family carries the label ``store`` (the name given to :func:`register`,
so several managers of one process stay apart) and, where it applies, ``tier``
(``host``, ``disk``, ``remote``). Names and units follow Prometheus's
conventions; :data:`METRICS` lists every family (the README has it as a table).

Three histograms time the calls an engine waits on, recorded in Rust without a
lock: ``dynblock_lookup_seconds`` (``lookup``, ``match``),
``dynblock_load_seconds`` (``get``, a lease's load, with any remote fetch) and
``dynblock_store_seconds`` (``put``, with a synchronous remote write). One call
in 32, chosen at random, is timed (timing every call would add about 60 ns, a
fifth of a small ``match``): their counts and sums are the sampled calls', their
distribution the calls'.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple

if TYPE_CHECKING:
    from .manager import BlockManager

Rows = List[Tuple[Optional[str], float]]
Stats = Dict[str, Any]


def _local(s: Stats) -> List[str]:
    return [t for t in ("host", "disk") if s.get(t)]


def _key(key: str, remote: bool = False) -> Callable[[Stats], Rows]:
    """A family of one counter of ``stats()`` (``remote``: only with a remote tier)."""
    return lambda s: [] if remote and s.get("remote") is None else [(None, s[key])]


def _per_tier(value: Callable[[Stats, str], float], remote: Optional[str] = None) -> Callable[[Stats], Rows]:
    """A family per local tier (``value(stats, tier)``), plus the remote tier's
    ``stats()[remote]`` when there is one."""
    def rows(s: Stats) -> Rows:
        out: Rows = [(t, value(s, t)) for t in _local(s)]
        if remote is not None and s.get("remote") is not None:
            out.append(("remote", s[remote]))
        return out
    return rows


def _remote_state(f: Callable[[Dict[str, Any]], float]) -> Callable[[Stats], Rows]:
    return lambda s: [] if s.get("remote") is None else [(None, f(s["remote"]))]


def _cap(s: Stats, t: str) -> int:
    return int(s[t]["capacity_blocks"])


def _checksum_failures(s: Stats) -> Rows:
    out: Rows = [("disk", s["corrupt_blocks"])] if s.get("disk") else []
    if s.get("remote") is not None:
        out.append(("remote", s["remote_corrupt"]))
    return out


def _hit_bytes(s: Stats) -> Rows:
    return [(t, v * s["block_size"]) for t, v in _per_tier(lambda s, t: s[f"{t}_hits"], "remote_hits")(s)]


#: (name, type, per tier, meaning, its samples from one ``stats()``): every
#: family the collector yields (histograms come from the manager's timers).
METRICS: List[Tuple[str, str, bool, str, Optional[Callable[[Stats], Rows]]]] = [
    ("dynblock_hits_total", "counter", True, "blocks a get found, by the tier serving them",
     _per_tier(lambda s, t: s[f"{t}_hits"], "remote_hits")),
    ("dynblock_hit_bytes_total", "counter", True, "bytes of those blocks", _hit_bytes),
    ("dynblock_misses_total", "counter", False, "blocks a get asked for past its stored prefix",
     _key("misses")),
    ("dynblock_remote_misses_total", "counter", False,
     "blocks the local tiers missed and the remote had not", _key("remote_misses", True)),
    ("dynblock_stored_blocks", "gauge", True, "blocks held (host, disk)",
     _per_tier(lambda s, t: s[f"{t}_blocks_used"])),
    ("dynblock_capacity_blocks", "gauge", True, "slots (host, disk)", _per_tier(_cap)),
    ("dynblock_used_bytes", "gauge", True, "bytes of the blocks held (host, disk)",
     _per_tier(lambda s, t: s[f"{t}_blocks_used"] * s["block_size"])),
    ("dynblock_capacity_bytes", "gauge", True, "bytes of the slots (host, disk)",
     _per_tier(lambda s, t: _cap(s, t) * s["block_size"])),
    ("dynblock_put_blocks_total", "counter", False, "blocks put", _key("put_blocks")),
    ("dynblock_put_new_blocks_total", "counter", False, "blocks put that were not stored yet",
     _key("put_new")),
    ("dynblock_evictions_total", "counter", True, "blocks evicted (host, disk)",
     _per_tier(lambda s, t: s[f"{t}_evictions"])),
    ("dynblock_offloaded_blocks_total", "counter", False,
     "host blocks written to disk (evicted or ahead)", _key("offloaded_blocks")),
    ("dynblock_offloaded_bytes_total", "counter", False, "bytes of those", _key("offloaded_bytes")),
    ("dynblock_promoted_blocks_total", "counter", False, "disk hits copied into the host tier",
     _key("onboarded_blocks")),
    ("dynblock_promoted_bytes_total", "counter", False, "bytes of those", _key("onboarded_bytes")),
    ("dynblock_dropped_blocks_total", "counter", False,
     "blocks whose last copy left (evicted, refused)", _key("dropped_blocks")),
    ("dynblock_disk_not_admitted_total", "counter", False,
     "host victims disk_admission kept off disk", _key("disk_not_admitted")),
    ("dynblock_rejected_full_total", "counter", False, "new blocks not stored: every slot leased",
     _key("rejected_full")),
    ("dynblock_leases_total", "counter", False, "leases taken by lookup", _key("leases")),
    ("dynblock_leases_held", "gauge", False, "leases taken and not yet used or released",
     _key("leases_held")),
    ("dynblock_checksum_failures_total", "counter", True,
     "blocks that failed their checksum (disk, remote)", _checksum_failures),
    ("dynblock_io_errors_total", "counter", False, "disk blocks that could not be read",
     _key("io_errors")),
    ("dynblock_failed_writes_total", "counter", False, "batches whose disk write failed",
     _key("failed_writes")),
    ("dynblock_o_direct", "gauge", True, "1 when the disk tier uses O_DIRECT (disk)",
     lambda s: [("disk", float(bool(s["disk"]["o_direct"])))] if s.get("disk") else []),
    ("dynblock_remote_up", "gauge", False, "1 unless the remote tier is down (backing off)",
     _remote_state(lambda r: 0.0 if r["down"] else 1.0)),
    ("dynblock_remote_refusing_writes", "gauge", False,
     "1 while the server refuses writes (OOM, ...)",
     _remote_state(lambda r: float(bool(r["refusing_writes"])))),
    ("dynblock_remote_queue_blocks", "gauge", False, "blocks queued for the remote writer",
     _remote_state(lambda r: float(r["queued"]))),
    ("dynblock_remote_stored_total", "counter", False, "blocks written to the remote tier",
     _key("remote_stored", True)),
    ("dynblock_remote_skipped_total", "counter", False,
     "blocks not written (tier down, queue full)", _key("remote_skipped", True)),
    ("dynblock_remote_errors_total", "counter", False, "failed connections and round trips",
     _key("remote_errors", True)),
    ("dynblock_remote_deadline_missed_total", "counter", False,
     "calls whose remote work hit its deadline", _key("remote_deadline_missed", True)),
    ("dynblock_remote_unauthenticated_total", "counter", False,
     "values without a valid MAC, not served", _key("remote_unauthenticated", True)),
    ("dynblock_remote_oversized_total", "counter", False, "replies longer than a value, refused",
     _key("remote_oversized", True)),
    ("dynblock_remote_deleted_total", "counter", False, "keys deleted by purge and remove with remote=True",
     _key("remote_deleted", True)),
    ("dynblock_lookup_seconds", "histogram", False, "time of lookup and match calls", None),
    ("dynblock_load_seconds", "histogram", False, "time of get calls and lease loads", None),
    ("dynblock_store_seconds", "histogram", False, "time of put calls", None),
]


class Collector:
    """A ``prometheus_client`` collector over one manager (see the module
    docs); a closed manager yields nothing."""

    def __init__(self, manager: "BlockManager", store: str) -> None:
        self.manager = manager
        self.store = store

    def describe(self) -> Iterator[Any]:
        return iter(())  # families depend on the tiers: described at collection

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)

        try:
            s = self.manager.stats()
            hist = self.manager._m.latencies()
        except ValueError:  # closed
            return
        times = {f"dynblock_{name}_seconds": (bounds, counts, total)
                 for name, bounds, counts, total in hist}
        for name, kind, per_tier, doc, source in METRICS:
            if source is None:
                bounds, counts, total = times[name]
                cumulative, buckets = 0, []
                for le, c in zip([*map(str, bounds), "+Inf"], counts):
                    cumulative += c
                    buckets.append((le, float(cumulative)))
                h = HistogramMetricFamily(name, doc, labels=["store"])
                h.add_metric([self.store], buckets, total)
                yield h
                continue
            rows = source(s)
            if not rows:
                continue
            labels = ["store", "tier"] if per_tier else ["store"]
            if kind == "counter":
                fam: Any = CounterMetricFamily(name[: -len("_total")], doc, labels=labels)
            else:
                fam = GaugeMetricFamily(name, doc, labels=labels)
            for tier, v in rows:
                fam.add_metric([self.store, tier] if per_tier else [self.store], float(v))
            yield fam


def register(manager: "BlockManager", registry: Any = None, store: str = "default") -> Collector:
    """Register a :class:`Collector` for ``manager`` with ``registry``
    (``prometheus_client.REGISTRY`` by default); unregister it with
    ``registry.unregister(collector)``. Needs ``prometheus_client``."""
    try:
        import prometheus_client
    except ImportError:
        raise ImportError("dynblock.metrics needs prometheus_client: pip install 'dynblock[metrics]' "
                          "(or pip install prometheus_client)") from None
    if not isinstance(store, str) or not store:
        raise ValueError(f"store must be a non-empty str, got {store!r}")
    c = Collector(manager, store)
    (registry if registry is not None else prometheus_client.REGISTRY).register(c)
    return c
