"""dynblock's metrics through vLLM's own ``/metrics``: the payload (no vLLM
here; :mod:`dynblock.vllm.metrics` holds the classes vLLM calls).

The store lives in vLLM's worker (``DynblockConnector``) or scheduler
(``DynblockTier``) process; vLLM's API server, which serves ``/metrics``,
is another process. So the counters travel the way vLLM moves its own
connector statistics: each engine step the store's counters since the last
step and its gauges go out in a stats payload (``get_kv_connector_stats`` /
``get_stats``), vLLM gathers them from every worker and hands them to the
Prometheus metrics the connector registered (``build_prom_metrics``, or the
``OffloadingConnector``'s from ``build_metric_definitions``).

The families are those of :data:`dynblock.metrics.METRICS` (same names,
units and meaning), less the three latency histograms, which are kept as
bucket counts in the store and have no place in vLLM's per-observation
payload (read them with :mod:`dynblock.metrics` in the process that holds
the store). vLLM adds its labels (``model_name``, ``engine``); per-tier
families add ``tier``. Gauges of several workers (tensor-parallel ranks,
each with its own store) are summed.

"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Tuple

from ..metrics import METRICS

if TYPE_CHECKING:
    from ..manager import BlockManager

#: (name, kind, per tier, meaning) of every family sent through vLLM.
FAMILIES: List[Tuple[str, str, bool, str]] = [
    (name, kind, per_tier, doc) for name, kind, per_tier, doc, source in METRICS
    if source is not None
]
_SOURCES = {name: source for name, _, _, _, source in METRICS if source is not None}
_KINDS = {name: kind for name, kind, _, _ in FAMILIES}

#: The payload: {"counters": {"name|tier": increase}, "gauges": {"name|tier|rank": value}}
#: (tier "" for families without one). Plain strings and numbers: it crosses
#: processes through vLLM's serializer.
Payload = Dict[str, Dict[str, float]]


def empty_payload() -> Payload:
    return {"counters": {}, "gauges": {}}


class Deltas:
    """The counters of one store since the last :meth:`take`, and its gauges
    now, as a :data:`Payload` (``rank`` keeps the gauges of several workers
    apart)."""

    def __init__(self, rank: int = 0) -> None:
        self.rank = rank
        self._last: Dict[str, float] = {}

    def take(self, manager: "BlockManager") -> Payload:
        out = empty_payload()
        try:
            s = manager.stats()
        except ValueError:  # closed
            return out
        for name, source in _SOURCES.items():
            for tier, v in source(s):
                key = f"{name}|{tier or ''}"
                if _KINDS[name] == "counter":
                    inc = float(v) - self._last.get(key, 0.0)
                    self._last[key] = float(v)
                    if inc > 0:
                        out["counters"][key] = inc
                else:
                    out["gauges"][f"{key}|{self.rank}"] = float(v)
        return out


def merge(into: Payload, other: Payload) -> Payload:
    """``other`` added to ``into`` (counters summed; each worker's gauges the
    latest); returns ``into``."""
    for key, v in other.get("counters", {}).items():
        into["counters"][key] = into["counters"].get(key, 0.0) + v
    into["gauges"].update(other.get("gauges", {}))
    return into


def totals(p: Payload) -> Tuple[Dict[Tuple[str, str], float], Dict[Tuple[str, str], float]]:
    """(counter increases, gauges summed over workers), by (name, tier)."""
    counters: Dict[Tuple[str, str], float] = {}
    for key, v in p.get("counters", {}).items():
        name, tier = key.split("|")
        counters[(name, tier)] = counters.get((name, tier), 0.0) + v
    gauges: Dict[Tuple[str, str], float] = {}
    for key, v in p.get("gauges", {}).items():
        name, tier, _ = key.split("|")
        gauges[(name, tier)] = gauges.get((name, tier), 0.0) + v
    return counters, gauges


def reduce(p: Payload) -> Dict[str, float]:
    """One line's worth for vLLM's log: ``name{tier}`` -> value."""
    counters, gauges = totals(p)
    return {(f"{n}{{{t}}}" if t else n): v for (n, t), v in {**counters, **gauges}.items()}
