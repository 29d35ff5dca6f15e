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

import threading
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple

if TYPE_CHECKING:
    from .manager import BlockManager

#: (name, type, per tier, meaning): every family the collector yields.
METRICS: List[Tuple[str, str, bool, str]] = [
    ("dynblock_hits_total", "counter", True, "blocks a get found, by the tier serving them"),
    ("dynblock_hit_bytes_total", "counter", True, "bytes of those blocks"),
    ("dynblock_misses_total", "counter", False, "blocks a get asked for past its stored prefix"),
    ("dynblock_remote_misses_total", "counter", False,
     "blocks the local tiers missed and the remote had not"),
    ("dynblock_stored_blocks", "gauge", True, "blocks held (host, disk)"),
    ("dynblock_capacity_blocks", "gauge", True, "slots (host, disk)"),
    ("dynblock_used_bytes", "gauge", True, "bytes of the blocks held (host, disk)"),
    ("dynblock_capacity_bytes", "gauge", True, "bytes of the slots (host, disk)"),
    ("dynblock_put_blocks_total", "counter", False, "blocks put"),
    ("dynblock_put_new_blocks_total", "counter", False, "blocks put that were not stored yet"),
    ("dynblock_evictions_total", "counter", True, "blocks evicted (host, disk)"),
    ("dynblock_offloaded_blocks_total", "counter", False,
     "host blocks written to disk (evicted or ahead)"),
    ("dynblock_offloaded_bytes_total", "counter", False, "bytes of those"),
    ("dynblock_promoted_blocks_total", "counter", False, "disk hits copied into the host tier"),
    ("dynblock_promoted_bytes_total", "counter", False, "bytes of those"),
    ("dynblock_dropped_blocks_total", "counter", False,
     "blocks whose last copy left (evicted, refused)"),
    ("dynblock_disk_not_admitted_total", "counter", False,
     "host victims disk_admission kept off disk"),
    ("dynblock_rejected_full_total", "counter", False, "new blocks not stored: every slot leased"),
    ("dynblock_leases_total", "counter", False, "leases taken by lookup"),
    ("dynblock_leases_held", "gauge", False, "leases taken and not yet used or released"),
    ("dynblock_checksum_failures_total", "counter", True,
     "blocks that failed their checksum (disk, remote)"),
    ("dynblock_io_errors_total", "counter", False, "disk blocks that could not be read"),
    ("dynblock_failed_writes_total", "counter", False, "batches whose disk write failed"),
    ("dynblock_o_direct", "gauge", True, "1 when the disk tier uses O_DIRECT (disk)"),
    ("dynblock_remote_up", "gauge", False, "1 unless the remote tier is down (backing off)"),
    ("dynblock_remote_refusing_writes", "gauge", False,
     "1 while the server refuses writes (OOM, ...)"),
    ("dynblock_remote_queue_blocks", "gauge", False, "blocks queued for the remote writer"),
    ("dynblock_remote_stored_total", "counter", False, "blocks written to the remote tier"),
    ("dynblock_remote_skipped_total", "counter", False,
     "blocks not written (tier down, queue full)"),
    ("dynblock_remote_errors_total", "counter", False, "failed connections and round trips"),
    ("dynblock_remote_deadline_missed_total", "counter", False,
     "calls whose remote work hit its deadline"),
    ("dynblock_remote_unauthenticated_total", "counter", False,
     "values without a valid MAC, not served"),
    ("dynblock_remote_oversized_total", "counter", False, "replies longer than a value, refused"),
    ("dynblock_lookup_seconds", "histogram", False, "time of lookup and match calls"),
    ("dynblock_load_seconds", "histogram", False, "time of get calls and lease loads"),
    ("dynblock_store_seconds", "histogram", False, "time of put calls"),
]


def samples(s: Dict[str, Any]) -> Dict[str, List[Tuple[Optional[str], float]]]:
    """The value of every family for one ``stats()`` dict: name -> [(tier or
    None, value)]. Families of a tier the manager lacks are left out."""
    bs = s["block_size"]
    host, disk, remote = s.get("host"), s.get("disk"), s.get("remote")
    tiers = [t for t, present in (("host", host), ("disk", disk)) if present]
    used = {"host": s["host_blocks_used"], "disk": s["disk_blocks_used"]}
    cap = {"host": host["capacity_blocks"] if host else 0, "disk": disk["capacity_blocks"] if disk else 0}
    hits = {"host": s["host_hits"], "disk": s["disk_hits"]}
    out: Dict[str, List[Tuple[Optional[str], float]]] = {
        "dynblock_hits_total": [(t, hits[t]) for t in tiers],
        "dynblock_hit_bytes_total": [(t, hits[t] * bs) for t in tiers],
        "dynblock_misses_total": [(None, s["misses"])],
        "dynblock_stored_blocks": [(t, used[t]) for t in tiers],
        "dynblock_capacity_blocks": [(t, cap[t]) for t in tiers],
        "dynblock_used_bytes": [(t, used[t] * bs) for t in tiers],
        "dynblock_capacity_bytes": [(t, cap[t] * bs) for t in tiers],
        "dynblock_put_blocks_total": [(None, s["put_blocks"])],
        "dynblock_put_new_blocks_total": [(None, s["put_new"])],
        "dynblock_evictions_total": [(t, s[f"{t}_evictions"]) for t in tiers],
        "dynblock_offloaded_blocks_total": [(None, s["offloaded_blocks"])],
        "dynblock_offloaded_bytes_total": [(None, s["offloaded_bytes"])],
        "dynblock_promoted_blocks_total": [(None, s["onboarded_blocks"])],
        "dynblock_promoted_bytes_total": [(None, s["onboarded_bytes"])],
        "dynblock_dropped_blocks_total": [(None, s["dropped_blocks"])],
        "dynblock_disk_not_admitted_total": [(None, s["disk_not_admitted"])],
        "dynblock_rejected_full_total": [(None, s["rejected_full"])],
        "dynblock_leases_total": [(None, s["leases"])],
        "dynblock_leases_held": [(None, s["leases_held"])],
        "dynblock_checksum_failures_total": [("disk", s["corrupt_blocks"])] if disk else [],
        "dynblock_io_errors_total": [(None, s["io_errors"])],
        "dynblock_failed_writes_total": [(None, s["failed_writes"])],
        "dynblock_o_direct": [("disk", float(bool(disk["o_direct"])))] if disk else [],
    }
    if remote is not None:
        out["dynblock_hits_total"].append(("remote", s["remote_hits"]))
        out["dynblock_hit_bytes_total"].append(("remote", s["remote_hits"] * bs))
        out["dynblock_checksum_failures_total"].append(("remote", s["remote_corrupt"]))
        out.update({
            "dynblock_remote_misses_total": [(None, s["remote_misses"])],
            "dynblock_remote_up": [(None, 0.0 if remote["down"] else 1.0)],
            "dynblock_remote_refusing_writes": [(None, float(bool(remote["refusing_writes"])))],
            "dynblock_remote_queue_blocks": [(None, remote["queued"])],
            "dynblock_remote_stored_total": [(None, s["remote_stored"])],
            "dynblock_remote_skipped_total": [(None, s["remote_skipped"])],
            "dynblock_remote_errors_total": [(None, s["remote_errors"])],
            "dynblock_remote_deadline_missed_total": [(None, s["remote_deadline_missed"])],
            "dynblock_remote_unauthenticated_total": [(None, s["remote_unauthenticated"])],
            "dynblock_remote_oversized_total": [(None, s["remote_oversized"])],
        })
    return out


class Collector:
    """A ``prometheus_client`` collector over one manager (see the module
    docs); a closed manager yields nothing."""

    def __init__(self, manager: "BlockManager", store: str) -> None:
        self.manager = manager
        self.store = store
        self._lock = threading.Lock()

    def describe(self) -> Iterator[Any]:
        return iter(())  # families depend on the tiers: described at collection

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)

        with self._lock:
            try:
                s = self.manager.stats()
                hist = self.manager._m.latencies()
            except ValueError:  # closed
                return
        values = samples(s)
        times = {f"dynblock_{name}_seconds": (bounds, counts, total)
                 for name, bounds, counts, total in hist}
        for name, kind, per_tier, doc in METRICS:
            if kind == "histogram":
                bounds, counts, total = times[name]
                cumulative, buckets = 0, []
                for le, c in zip([*map(str, bounds), "+Inf"], counts):
                    cumulative += c
                    buckets.append((le, float(cumulative)))
                h = HistogramMetricFamily(name, doc, labels=["store"])
                h.add_metric([self.store], buckets, total)
                yield h
                continue
            rows = values.get(name)
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
