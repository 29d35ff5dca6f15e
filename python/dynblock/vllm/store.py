"""A dynblock store seen the way a layer-by-layer engine uses it: one dynblock
block per (engine block, layer), keys from the engine's block hashes, leases
held per request between "how much is cached" and "load it", and tensors moved
at given rows (zero-copy for row-addressable CPU tensors, staged otherwise).
Needs no vLLM; torch only for tensors that are not row-addressable."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..config import Config, KvLayout, split_engine_config
from ..manager import BlockManager, Job, Lease, _layout_fingerprint
from .keys import layer_keys

log = logging.getLogger("dynblock.vllm")

#: ``kv_connector_extra_config`` keys that are the connector's own; every
#: other key is a :class:`dynblock.Config` field.
CONNECTOR_OPTIONS = {
    "lookup_timeout_ms": 50,  # how long the scheduler waits for a worker's lookup
    "lease_ttl_s": 30.0,  # a lookup lease never loaded is released after this
}


def split_extra_config(extra: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``kv_connector_extra_config`` -> (``Config`` fields, connector options);
    unknown keys and the fields the connector derives raise ``ValueError``."""
    fields, given = split_engine_config(
        extra, where="kv_connector_extra_config", own=CONNECTOR_OPTIONS,
        own_are="a connector option", derived_from="the model's KV cache")
    return fields, {**CONNECTOR_OPTIONS, **given}


@dataclass
class _Held:
    leases: List[Lease]
    count: int
    since: float = field(default_factory=time.monotonic)


def row_view(tensor: Any, num_blocks: int) -> "tuple[bool, int, str]":
    """Whether ``tensor`` (an engine's KV buffer of one layer) can be moved at
    rows without staging: returns ``(zero_copy, block_dim, why_not)``. The
    block dimension is the first of size ``num_blocks``; zero-copy needs a CPU
    tensor, contiguous, with the blocks outermost (so block ``b`` is row ``b``
    of ``[num_blocks, row_bytes]``)."""
    shape = tuple(int(d) for d in tensor.shape)
    dims = [i for i, d in enumerate(shape) if d == num_blocks]
    if not dims:
        raise ValueError(f"no dimension of the KV tensor {shape} has the engine's {num_blocks} blocks")
    bd = dims[0]
    device = str(getattr(tensor, "device", "cpu"))
    if device != "cpu":
        return False, bd, f"the KV tensor is on {device}"
    if bd != 0:
        return False, bd, f"blocks are dimension {bd} of {shape}, not the outermost"
    if hasattr(tensor, "is_contiguous") and not tensor.is_contiguous():
        return False, bd, "the KV tensor is not contiguous"
    return True, bd, ""


class _Staged:
    """A load through a staging buffer: ``wait()`` finishes the copy into the
    engine's tensor (the rows whose blocks arrived) and returns which did."""

    def __init__(self, job: Job, staged: Any, tensor: Any, block_dim: int, rows: Sequence[int]):
        self._job, self._staged, self._tensor, self._bd, self._rows = job, staged, tensor, block_dim, rows
        self._ok: Optional[List[bool]] = None

    def done(self) -> bool:
        return self._job.done()

    def wait(self, timeout: Optional[float] = None) -> List[bool]:
        if self._ok is None:
            ok: List[bool] = self._job.wait(timeout)  # type: ignore[assignment]
            got = [i for i, a in enumerate(ok) if a]
            if got:
                import torch

                dev = self._tensor.device
                idx = torch.tensor([self._rows[i] for i in got], dtype=torch.long, device=dev)
                src = torch.tensor(got, dtype=torch.long)
                self._tensor.movedim(self._bd, 0)[idx] = self._staged[src].to(dev)
            self._ok = ok
        return self._ok


class LayerStore:
    """A :class:`~dynblock.BlockManager` holding one block per (engine block,
    layer) of a model with ``config.layout`` (``per_layer=True``; its
    ``num_layers`` is the model's depth)."""

    def __init__(self, config: Config, lease_ttl_s: float = 30.0) -> None:
        if config.layout is None or not config.layout.per_layer:
            raise ValueError("LayerStore needs a Config with layout=KvLayout(..., per_layer=True)")
        self.kv = BlockManager(config)
        self.num_layers = config.layout.num_layers
        self.fingerprint = _layout_fingerprint(config)
        self.lease_ttl_s = lease_ttl_s
        self._held: Dict[str, _Held] = {}
        self._lock = threading.Lock()
        self.lookups = 0
        self.hit_blocks = 0
        # Remote blocks a lookup's budget could not wait for, warmed into the local tiers in
        # the background for the next lookup (bounded: what does not fit is dropped, counted).
        self._warm: "queue.Queue[Optional[Tuple[List[bytes], Optional[str]]]]" = \
            queue.Queue(maxsize=16)
        self._warmer: Optional[threading.Thread] = None
        self.warmed_blocks = 0
        self.warm_dropped = 0

    @staticmethod
    def layout_for(num_layers: int, block_tokens: int, row_shape: Sequence[int], dtype: Any,
                   mla: bool = False) -> KvLayout:
        """The per-layer :class:`~dynblock.KvLayout` of a KV tensor whose block
        rows have ``row_shape`` (the tensor's shape without its block
        dimension)."""
        elems = 1
        for d in row_shape:
            elems *= int(d)
        outer = 1 if mla else 2
        if elems % (outer * block_tokens):
            raise ValueError(f"a KV block row of shape {tuple(row_shape)} is not {outer} x "
                             f"{block_tokens} tokens x a row width")
        return KvLayout(num_layers=num_layers, outer_dim=outer, page_size=block_tokens,
                        inner_dim=elems // (outer * block_tokens), dtype=dtype, per_layer=True)

    def keys(self, hashes: Sequence[bytes], layer: int) -> List[int]:
        return layer_keys(hashes, layer, self.fingerprint)

    # --- leases, per request ----------------------------------------------
    def lookup(self, req_id: str, hashes: Sequence[bytes], timeout: Optional[float] = None,
               namespace: Optional[str] = None) -> int:
        """Lease the longest prefix of ``hashes`` (in ``namespace``: the
        request's tenant, None for the shared namespace) stored for every
        layer, for ``req_id`` (its earlier lease is released); returns its
        length. With
        ``timeout`` (seconds), the remote tier's part of the whole lookup ends
        by then: what it could not deliver in time is not leased (and is in
        the host tier for a later lookup when it arrived)."""
        self.release(req_id)
        self._expire()
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        c = len(hashes)
        leases: List[Lease] = []
        while c:
            leases = []
            for layer in range(self.num_layers):
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                lease = self.kv.lookup(self.keys(hashes[:c], layer), timeout=left, namespace=namespace)
                leases.append(lease)
                if lease.count < c:
                    break
            m = min(le.count for le in leases)
            if m == c and len(leases) == self.num_layers:
                break
            for le in leases:
                le.release()
            leases, c = [], m
        self.lookups += 1
        if c:
            self.hit_blocks += c
            with self._lock:
                self._held[req_id] = _Held(leases, c)
        if deadline is not None and c < len(hashes) and self.kv.config.remote \
                and time.monotonic() >= deadline:
            self._warm_later(list(hashes[c:]), namespace)
        return c

    def _warm_later(self, hashes: List[bytes], namespace: Optional[str]) -> None:
        """Fetch blocks the budget cut off into the local tiers in the background (within
        ``remote_timeout_ms``), so a later lookup of the same prefix hits locally."""
        if self._warmer is None:
            t = threading.Thread(target=self._warm_loop, name="dynblock-warm", daemon=True)
            try:
                t.start()
            except RuntimeError:
                self.warm_dropped += len(hashes)
                return
            self._warmer = t
        try:
            self._warm.put_nowait((hashes, namespace))
        except queue.Full:
            self.warm_dropped += len(hashes)

    def _warm_loop(self) -> None:
        while True:
            item = self._warm.get()
            if item is None or self.kv.closed:
                return
            hashes, namespace = item
            try:
                # Every layer's blocks in one lookup: one pipelined round trip per 64 blocks.
                keys = [k for layer in range(self.num_layers) for k in self.keys(hashes, layer)]
                with self.kv.lookup(keys, namespace=namespace) as lease:
                    self.warmed_blocks += lease.count
            except Exception as e:  # closed meanwhile, or the remote failed: only hits lost
                log.debug("dynblock: warming remote blocks failed: %s", e)

    def take(self, req_id: str) -> Optional[_Held]:
        """The request's leases (now the caller's to use or release)."""
        with self._lock:
            return self._held.pop(req_id, None)

    def release(self, req_id: str) -> bool:
        held = self.take(req_id)
        if held is None:
            return False
        for le in held.leases:
            le.release()
        return True

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            old = [r for r, h in self._held.items() if now - h.since > self.lease_ttl_s]
        for r in old:
            if self.release(r):
                log.warning("dynblock: released the lease of request %s after %.0f s unused", r,
                            self.lease_ttl_s)

    # --- moving blocks ----------------------------------------------------
    def save(self, layer: int, hashes: Sequence[bytes], tensor: Any, rows: Sequence[int],
             zero_copy: bool, block_dim: int = 0, keys: Optional[Sequence[int]] = None,
             namespace: Optional[str] = None) -> Job:
        """Store rows ``rows`` of one layer's KV tensor under ``hashes`` (whose
        :meth:`keys` the caller may pass, if it has them) in ``namespace``, in
        the background; the job keeps what it reads alive."""
        keys = self.keys(hashes, layer) if keys is None else list(keys)
        if zero_copy:
            return self.kv.put_async(keys, tensor, rows=list(rows), namespace=namespace)
        import torch

        idx = torch.tensor(list(rows), dtype=torch.long, device=tensor.device)
        staged = tensor.movedim(block_dim, 0)[idx].to("cpu").contiguous()
        return self.kv.put_async(keys, staged, namespace=namespace)

    def load(self, layer: int, src: "Lease | Sequence[bytes]", tensor: Any, rows: Sequence[int],
             zero_copy: bool, block_dim: int = 0,
             hashes: Optional[Sequence[bytes]] = None, namespace: Optional[str] = None) -> Any:
        """Read a lease (with the ``hashes`` it was looked up with) or the
        stored blocks of ``hashes`` (in ``namespace``; a lease keeps its own)
        of one layer into rows ``rows`` of its KV tensor in the background;
        ``wait()`` returns, for each row, whether its block arrived (a block
        that fails its check does not stop the ones after it)."""
        keys = self.keys(hashes if hashes is not None else
                         ([] if isinstance(src, Lease) else src), layer)
        what = src if isinstance(src, Lease) else keys
        if zero_copy:
            return self.kv.get_each_async(what, tensor, rows=list(rows), lease_hashes=keys,
                                          namespace=namespace)
        import torch

        shape = list(tensor.movedim(block_dim, 0).shape[1:])
        staged = torch.empty([len(rows)] + shape, dtype=tensor.dtype, device="cpu")
        return _Staged(self.kv.get_each_async(what, staged, lease_hashes=keys, namespace=namespace),
                       staged, tensor, block_dim, rows)

    def close(self) -> None:
        if self._warmer is not None:
            while True:  # drop what waits; the one running ends within remote_timeout_ms
                try:
                    self._warm.get_nowait()
                except queue.Empty:
                    break
            try:
                self._warm.put(None, timeout=1)
            except queue.Full:  # a lookup slipped one in: the thread ends at the closed check
                pass
            self._warmer.join(timeout=30)
        with self._lock:
            held, self._held = list(self._held.values()), {}
        for h in held:
            for le in h.leases:
                le.release()
        try:
            self.kv.wait_all(timeout=60)
        except TimeoutError as e:
            log.warning("dynblock: closing the store with jobs still running: %s", e)
        try:
            self.kv.close()
        except OSError as e:
            # The store is closed anyway; only the host-only blocks meant for a restart are lost.
            log.warning("dynblock: closing the store could not write its host-only blocks to "
                        "disk (%s); a restart will not find them", e)
