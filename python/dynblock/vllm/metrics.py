"""The classes through which vLLM carries dynblock's metrics to its
``/metrics`` (see :mod:`dynblock.vllm.stats` for what is sent and how):
``DynblockStats`` (a ``KVConnectorStats``: it crosses processes, so it lives
at module level) and ``DynblockPromMetrics`` for ``DynblockConnector``;
:func:`offloading_definitions` and :func:`offloading_stats` for
``DynblockTier`` under vLLM's offloading connector. And the KV events
(:mod:`dynblock.vllm.events`) on their way from the workers to vLLM's
event publisher: ``DynblockKVEvents`` and :func:`kv_events`."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from vllm.distributed.kv_events import (
    MEDIUM_CPU,
    MEDIUM_STORAGE,
    BlockRemoved,
    BlockStored,
    KVCacheEvent,
    KVConnectorKVEvents,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import (
    OffloadingConnectorStats,
)
from vllm.v1.kv_offload.base import OffloadingCounterMetadata, OffloadingGaugeMetadata

from .events import BlockEvent
from .stats import FAMILIES, Payload, empty_payload, merge, reduce, totals


class DynblockStats(KVConnectorStats):
    """dynblock's counters and gauges of one interval, as a
    :data:`~dynblock.vllm.stats.Payload` in ``data``."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = empty_payload()

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        if other is not None and not other.is_empty():
            merge(self.data, other.data)
        return self

    def reduce(self) -> Dict[str, Any]:
        return reduce(self.data)

    def is_empty(self) -> bool:
        return not (self.data.get("counters") or self.data.get("gauges"))


def build_stats(data: Optional[Dict[str, Any]] = None) -> DynblockStats:
    """A ``DynblockStats`` over ``data`` (a payload, or empty)."""
    return DynblockStats(data=dict(data) if data else empty_payload())


class DynblockPromMetrics(KVConnectorPromMetrics):
    """Registers dynblock's families with vLLM's metric classes (vLLM's
    labels, plus ``tier`` where it applies) and records each payload vLLM
    observes: counters increase, gauges are set (summed over workers)."""

    def __init__(self, vllm_config: Any, metric_types: Any, labelnames: List[str],
                 per_engine_labelvalues: Dict[int, List[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._families: Dict[str, Any] = {}
        for name, kind, per_tier, doc in FAMILIES:
            cls = self._counter_cls if kind == "counter" else self._gauge_cls
            self._families[name] = cls(name=name, documentation=f"dynblock: {doc}",
                                       labelnames=labelnames + (["tier"] if per_tier else []))
        self._bound: Dict[Tuple[int, str, str], Any] = {}

    def _metric(self, engine: int, name: str, tier: str) -> Any:
        key = (engine, name, tier)
        m = self._bound.get(key)
        if m is None:
            values = list(self.per_engine_labelvalues[engine]) + ([tier] if tier else [])
            m = self._bound[key] = self._families[name].labels(*values)
        return m

    def observe(self, transfer_stats_data: Dict[str, Any], engine_idx: int = 0) -> None:
        counters, gauges = totals(transfer_stats_data)
        for (name, tier), v in counters.items():
            if name in self._families:
                self._metric(engine_idx, name, tier).inc(v)
        for (name, tier), v in gauges.items():
            if name in self._families:
                self._metric(engine_idx, name, tier).set(v)


def offloading_definitions() -> Dict[str, Any]:
    """dynblock's families as the metric definitions of vLLM's offloading
    connector (``DynblockTier.build_metric_definitions``)."""
    out: Dict[str, Any] = {}
    for name, kind, per_tier, doc in FAMILIES:
        cls = OffloadingCounterMetadata if kind == "counter" else OffloadingGaugeMetadata
        out[name] = cls(documentation=f"dynblock: {doc}", labelnames=("tier",) if per_tier else ())
    return out


def offloading_stats(p: Payload) -> Optional[OffloadingConnectorStats]:
    """A payload as vLLM's ``OffloadingConnectorStats`` (``DynblockTier.get_stats``),
    or None when it holds nothing."""
    counters, gauges = totals(p)
    if not counters and not gauges:
        return None
    st = OffloadingConnectorStats()
    # tier is "" exactly for the families without a tier label
    for (name, tier), v in counters.items():
        st.increase_counter(name, v, (tier,) if tier else ())
    for (name, tier), v in gauges.items():
        st.set_gauge(name, v, (tier,) if tier else ())
    return st


#: dynblock's tiers as vLLM's event media.
MEDIUM = {"host": MEDIUM_CPU, "disk": MEDIUM_STORAGE}


class DynblockKVEvents(KVConnectorKVEvents):
    """The KV events of one step, one sequence per worker (vLLM adds each
    worker's with ``add_events``). A block counts for the engine once every
    tensor-parallel worker reports it (each holds its shard):
    :meth:`aggregate` keeps, in the first worker's order, its events that
    every other worker sent too."""

    def __init__(self, num_workers: int = 1) -> None:
        self._seqs: List[List[KVCacheEvent]] = []
        self._workers = num_workers

    def add_events(self, events: List[KVCacheEvent]) -> None:
        self._seqs.append(list(events))

    def aggregate(self) -> "DynblockKVEvents":
        if len(self._seqs) > 1:
            others = [set(s) for s in self._seqs[1:]]
            self._seqs = [[e for e in self._seqs[0] if all(e in o for o in others)]]
        self._workers = 1
        return self

    def increment_workers(self, count: int = 1) -> None:
        self._workers += count

    def get_all_events(self) -> List[KVCacheEvent]:
        return [e for s in self._seqs for e in s]

    def get_number_of_workers(self) -> int:
        return self._workers

    def clear_events(self) -> None:
        self._seqs = []
        self._workers = 1


def kv_events(events: List[BlockEvent], block_tokens: int) -> List[KVCacheEvent]:
    """vLLM's event objects for :class:`~dynblock.vllm.events.BlockEvents`' output:
    the medium named (host: CPU, disk: STORAGE), ``ownership="dynblock"``."""
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

    out: List[KVCacheEvent] = []
    for kind, tier, h in events:
        if kind == "stored":
            out.append(BlockStored(block_hashes=[maybe_convert_block_hash(h)], parent_block_hash=None,
                                   token_ids=[], block_size=block_tokens, lora_id=None,
                                   medium=MEDIUM[tier], lora_name=None, ownership="dynblock"))
        else:
            out.append(BlockRemoved(block_hashes=[maybe_convert_block_hash(h)],
                                    medium=MEDIUM[tier], ownership="dynblock"))
    return out
