"""KV events per vLLM block, from a :class:`~dynblock.vllm.LayerStore`'s tier
events (no vLLM here; the connector wraps them in vLLM's event classes).

The store holds one dynblock block per (vLLM block, layer), under a key
derived from the vLLM block hash (:func:`~dynblock.vllm.keys.block_key`), so
a tier event names a key, not a vLLM block. :class:`BlockEvents` maps the
keys this worker saved back to their vLLM block and layer, and says a vLLM
block is stored in a tier once every layer of it is there, and removed from
it when the first of its layers leaves after that: what a KV-aware router
can use (a prefix it can serve from that tier).

Blocks a persistent store recovered at start are not announced: the store
keeps the keys, which cannot be turned back into vLLM block hashes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

if TYPE_CHECKING:
    from ..manager import BlockManager

#: (kind, tier, vLLM block hash): kind "stored" or "removed", tier "host" or "disk".
BlockEvent = Tuple[str, str, bytes]

#: Tier changes a store keeps between two engine steps at most (past it the
#: oldest are dropped, counted and logged once).
EVENTS_KEPT = 1 << 18


def watch(kv: "BlockManager", num_layers: int) -> "BlockEvents":
    """Start recording ``kv``'s tier changes; the :class:`BlockEvents` that
    turns them into events per engine block of ``num_layers`` layers
    (remembering at most 4x the keys the store's tiers hold)."""
    st = kv.stats()
    held = sum(int(st[t]["capacity_blocks"]) for t in ("host", "disk") if st.get(t))
    kv.watch_events(EVENTS_KEPT)
    return BlockEvents(num_layers, limit=max(4 * held, 1024))


class BlockEvents:
    """The mapping from this worker's keys to vLLM blocks, and which layers
    of each are in which tier (see the module docs). ``limit`` bounds the
    keys remembered: past it, the oldest that no tier holds (saved but not
    stored yet, refused, or gone: a key moving from host to disk is in
    neither for a moment) are forgotten."""

    def __init__(self, num_layers: int, limit: int) -> None:
        self.num_layers = num_layers
        self.limit = limit
        # Keys are (namespace, store key): the store's blocks of one key in two namespaces
        # are two blocks.
        self._block: Dict[Tuple[Optional[str], int], Tuple[bytes, int]] = {}  # -> (vLLM hash, layer)
        self._tiers: Dict[Tuple[Optional[str], int], Set[str]] = {}  # -> tiers holding it
        # (namespace, vLLM hash, tier) -> layers held
        self._layers: Dict[Tuple[Optional[str], bytes, str], int] = {}

    def saved(self, hashes: Sequence[bytes], layer: int, keys: Sequence[int],
              namespace: Optional[str] = None) -> None:
        """This worker asked the store to save ``hashes``' layer ``layer``
        under ``keys`` in ``namespace``."""
        for h, key in zip(hashes, keys):
            k = (namespace, key)
            if k not in self._block:
                self._block[k] = (bytes(h), layer)
                self._tiers[k] = set()
        if len(self._block) > self.limit:
            self._forget_idle()

    def _forget_idle(self) -> None:
        # down to 3/4 of the limit, so that the scan runs once per limit/4 saves
        idle = [k for k, t in self._tiers.items() if not t]
        for k in idle[: len(self._block) - self.limit * 3 // 4]:
            del self._block[k], self._tiers[k]

    def apply(self, events: Iterable[Tuple[Any, ...]]) -> List[BlockEvent]:
        """The vLLM-block events that the store's tier events (``kind``,
        ``tier``, key, namespace (None when absent): oldest first) amount to."""
        out: List[BlockEvent] = []
        for kind, tier, key, *rest in events:
            if kind == "cleared":  # each whole block leaves its tiers (not vLLM's own cache)
                out += [("removed", t, h) for (_, h, t), n in self._layers.items()
                        if n == self.num_layers]
                self._layers.clear()
                for t in self._tiers.values():
                    t.clear()
                continue
            ns = rest[0] if rest else None
            where = self._tiers.get((ns, key))
            if where is None or tier is None:
                continue  # not saved by this worker (recovered at start)
            h, _ = self._block[(ns, key)]
            n = self._layers.get((ns, h, tier), 0)
            if kind == "stored" and tier not in where:
                where.add(tier)
                self._layers[(ns, h, tier)] = n + 1
                if n + 1 == self.num_layers:
                    out.append(("stored", tier, h))
            elif kind == "removed" and tier in where:
                where.discard(tier)
                if n == self.num_layers:
                    out.append(("removed", tier, h))
                if n > 1:
                    self._layers[(ns, h, tier)] = n - 1
                else:
                    self._layers.pop((ns, h, tier), None)
        return out
