"""``DynblockTier``: dynblock as a secondary tier of vLLM's
``TieringOffloadingSpec`` (vLLM's CPU tier is primary; GPU hosts).

vLLM moves KV between the GPU and its CPU tier and asks secondary tiers to
copy chunks between that CPU tier (a memoryview of shape ``(num_chunks,
chunk_bytes)``) and their own storage. Here a chunk is one dynblock block:
stores are ``put_async`` of the chunks' rows, loads ``get_async`` into the
rows vLLM allocated, both zero-copy on the primary tier's memory; they run
on dynblock's job threads, never on the scheduler's::

    kv_transfer_config={
        "kv_connector": "OffloadingConnector", "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "spec_name": "TieringOffloadingSpec", "cpu_bytes_to_use": 16 << 30,
            "secondary_tiers": [{"type": "DynblockTier", "module_path": "dynblock.vllm",
                                 "disk_path": "/nvme/kv.bin", "persist": True,
                                 "disk_bytes": 500 << 30}]}}

Every other key of the tier's entry is a :class:`dynblock.Config` field
(``block_size`` comes from the primary tier).

Tenants: vLLM hands a secondary tier each request's ``kv_transfer_params``
(and no ``cache_salt``). A request whose ``kv_transfer_params`` carry
``"dynblock_namespace": NAME`` has its chunks looked up, touched, stored and
loaded in the store namespace ``NAME`` (so ``stats(namespace=)``,
``set_quota`` and ``purge`` apply per tenant); other requests use the shared
namespace. Whoever sets ``kv_transfer_params`` chooses the namespace: set it
in a gateway, not from end users' input. A value that is not a non-empty
str of at most 1024 UTF-8 bytes is refused: the request's chunks miss and
are not stored (logged once).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, ClassVar, Deque, Dict, Iterable, List, Optional

import numpy as np
from vllm.v1.kv_offload.base import (LookupResult, Medium, OffloadingEvent, OffloadKey,
                                      RequestOffloadingContext)
from vllm.v1.kv_offload.tiering.base import JobResult, SecondaryTierManager, TransferJob

from ..config import Config
from ..manager import BlockManager, Job
from . import metrics, stats
from .._once import LogOnce
from .events import BlockEvents, watch as watch_events
from .keys import block_key
from .service import MAX_NAMESPACE_BYTES
from .store import CONNECTOR_OPTIONS, split_extra_config

if TYPE_CHECKING:
    from vllm.v1.kv_offload.base import OffloadingSpec, OffloadKey, ReqContext

log = logging.getLogger("dynblock.vllm")

#: The ``kv_transfer_params`` key that names a request's store namespace.
NAMESPACE_PARAM = "dynblock_namespace"
#: A request whose namespace was refused.
_REFUSED = object()


def tier_fingerprint(spec: Any, chunk_bytes: int) -> int:
    """What makes two engines' chunks interchangeable: the model and its KV
    dtype, tokens per block and per chunk, the parallel layout, the chunk's
    bytes. Part of every key, so another model's chunks are never read."""
    cfg = getattr(spec, "config", None)
    parts = [f"chunk={chunk_bytes}"]
    if cfg is not None:
        model, cache, par = getattr(cfg, "model", None), getattr(cfg, "cache", None), getattr(cfg, "parallel", None)
        parts += [f"model={getattr(model, 'name', '')}", f"dtype={getattr(model, 'dtype', '')}",
                  f"tokens={[g.tokens_per_block for g in getattr(cfg, 'groups', ())]}",
                  f"hash={getattr(cache, 'tokens_per_hash', '')}",
                  f"chunk_blocks={getattr(cache, 'blocks_per_chunk', '')}",
                  f"world={getattr(par, 'world_size', '')}",
                  f"layout={getattr(cfg, 'kv_cache_layout', '')}"]
    digest = hashlib.blake2b("/".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class DynblockTier(SecondaryTierManager):
    """A secondary tier on a dynblock store (host and/or disk tiers)."""

    medium: ClassVar[Medium] = Medium.STORAGE

    def __init__(self, offloading_spec: "OffloadingSpec", primary_kv_view: memoryview,
                 tier_type: str, backpressure_detector: Any = None, **config: Any) -> None:
        super().__init__(offloading_spec=offloading_spec, primary_kv_view=primary_kv_view,
                         tier_type=tier_type, backpressure_detector=backpressure_detector)
        fields, _ = split_extra_config(config)
        if CONNECTOR_OPTIONS.keys() & config.keys():
            raise ValueError("lookup_timeout_ms and lease_ttl_s are DynblockConnector options; "
                             "DynblockTier runs in the scheduler and needs neither")
        view = primary_kv_view
        if view.ndim != 2 or not view.c_contiguous or view.shape is None:
            raise ValueError(f"the primary tier's view must be a contiguous (chunks, bytes) array, "
                             f"got shape {view.shape} strides {view.strides}")
        # A numpy array over the primary tier's memory (no copy): rows are chunks.
        chunks = int(view.shape[0])
        self._primary = np.frombuffer(view.cast("B"), dtype=np.uint8).reshape(chunks, -1)
        self._fingerprint = tier_fingerprint(offloading_spec, self.block_size_bytes)
        self.kv = BlockManager(Config.from_env(**fields, block_size=self.block_size_bytes))
        # Every job moves chunks between the primary tier and the store: its
        # memory is registered with the disk engine (no page pinning per I/O
        # on vLLM's /dev/shm region; skipped on huge pages). Held until close.
        self.kv.register_buffer(self._primary)
        self._done: Deque[JobResult] = collections.deque()
        self._lock = threading.Lock()
        self._pending = 0
        self._idle = threading.Condition(self._lock)
        self._once = LogOnce(log)
        self.counters = {"stored_chunks": 0, "loaded_chunks": 0, "failed_jobs": 0}
        self._deltas = stats.Deltas()
        # KV events (vLLM's --kv-events-config): the store's tier changes, per chunk
        self._events: Optional[BlockEvents] = None
        ev = getattr(offloading_spec, "kv_events_config", None)
        if ev is not None and getattr(ev, "enable_kv_cache_events", False):
            self._events = watch_events(self.kv, 1)

    def _keys(self, keys: Iterable["OffloadKey"]) -> List[int]:
        return [block_key(bytes(k), 0, self._fingerprint) for k in keys]

    def _namespace(self, req_context: Optional["ReqContext"]) -> Any:
        """The request's store namespace (None: the shared one), or ``_REFUSED``."""
        params = getattr(req_context, "kv_transfer_params", None)
        ns = params.get(NAMESPACE_PARAM) if isinstance(params, dict) else None
        if ns is None:
            return None
        if isinstance(ns, str) and ns and len(ns.encode("utf-8", "replace")) <= MAX_NAMESPACE_BYTES:
            return ns
        self._once("namespace", "dynblock tier: request %s: kv_transfer_params[%r] must be a "
                   "non-empty str of at most %d bytes, got %s; its chunks are neither looked up "
                   "nor stored (logged once)", getattr(req_context, "req_id", "?"),
                   NAMESPACE_PARAM, MAX_NAMESPACE_BYTES, type(ns).__name__)
        return _REFUSED

    def lookup(self, key: "OffloadKey", req_context: "ReqContext") -> LookupResult:
        ns = self._namespace(req_context)
        if ns is _REFUSED:
            return LookupResult.MISS
        hit = self.kv.contains(self._keys([key])[0], namespace=ns)
        return LookupResult.HIT if hit else LookupResult.MISS

    def touch(self, keys: Any, req_context: "ReqContext") -> None:
        ns = self._namespace(req_context)
        if ns is not _REFUSED:
            self.kv.touch(self._keys(keys), namespace=ns)

    def _submit(self, job: TransferJob, load: bool) -> None:
        keys = list(job.keys)
        rows = [int(c) for c in np.asarray(job.chunk_ids).reshape(-1)]
        if len(keys) != len(rows):
            raise ValueError(f"job {job.job_id}: {len(keys)} keys but {len(rows)} chunk_ids")
        ns = self._namespace(job.req_context)
        if ns is _REFUSED:
            self.counters["failed_jobs"] += 1
            with self._lock:
                self._done.append(JobResult(job_id=job.job_id, success=False,
                                            successful_keys=[] if load else None))
            return
        hashes = self._keys(keys)
        if not load and self._events is not None:
            self._events.saved([bytes(k) for k in keys], 0, hashes, ns)
        t0 = time.monotonic()
        with self._lock:
            self._pending += 1
        if load:
            fut = self.kv.get_each_async(hashes, self._primary, rows=rows, namespace=ns)
        else:
            fut = self.kv.put_async(hashes, self._primary, rows=rows, namespace=ns)
        fut.add_done_callback(lambda j: self._finish(job, keys, load, j, t0))

    def _finish(self, job: TransferJob, keys: List[Any], load: bool, done: Job, t0: float) -> None:
        try:
            res = done.wait(0)
            err: Optional[BaseException] = None
        except Exception as e:
            res, err = 0, e
        if err is not None:
            result = JobResult(job_id=job.job_id, success=False)
            self.counters["failed_jobs"] += 1
            self._once("failed", "dynblock tier: a %s job failed (%s: %s); vLLM treats its chunks "
                       "as missing (logged once)", "load" if load else "store",
                       type(err).__name__, err)
        elif load:
            # Every chunk that arrived counts, also those after one that failed its check.
            ok: List[bool] = res  # type: ignore[assignment]
            n = sum(ok)
            self.counters["loaded_chunks"] += n
            result = JobResult(job_id=job.job_id, success=n == len(keys),
                               successful_keys=None if n == len(keys) else
                               [k for k, a in zip(keys, ok) if a],
                               transfer_time=time.monotonic() - t0,
                               transfer_bytes=n * self.block_size_bytes)
        else:
            self.counters["stored_chunks"] += len(keys)
            result = JobResult(job_id=job.job_id, success=True,
                               transfer_time=time.monotonic() - t0,
                               transfer_bytes=len(keys) * self.block_size_bytes)
        with self._lock:
            self._done.append(result)
            self._pending -= 1
            self._idle.notify_all()

    def submit_store(self, job_metadata: TransferJob) -> None:
        self._submit(job_metadata, load=False)

    def submit_load(self, job_metadata: TransferJob) -> None:
        self._submit(job_metadata, load=True)

    def get_finished_jobs(self) -> Iterable[JobResult]:
        out = []
        with self._lock:
            while self._done:
                out.append(self._done.popleft())
        return out

    def has_pending_work(self) -> bool:
        with self._lock:
            return self._pending > 0

    def on_new_request(self, req_context: "ReqContext") -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def drain_jobs(self) -> None:
        with self._lock:
            while self._pending:
                self._idle.wait()

    def shutdown(self) -> None:
        if not self.kv.closed:
            self.drain_jobs()
            try:
                self.kv.close()
            except OSError as e:  # closed anyway; only the host-only blocks are lost
                log.warning("dynblock tier: closing the store could not write its host-only "
                            "blocks to disk (%s); a restart will not find them", e)

    def stats(self) -> Dict[str, Any]:
        """The tier's job counters and its store's ``stats()``."""
        out: Dict[str, Any] = dict(self.counters)
        if not self.kv.closed:
            out["store"] = self.kv.stats()
        return out

    def take_events(self) -> Iterable[OffloadingEvent]:
        """Chunks stored into and removed from the store's tiers since the
        last call (host: medium CPU, disk: STORAGE; ``ownership`` this tier's
        type), when vLLM's KV events are on."""
        if self._events is None or self.kv.closed:
            return ()
        try:
            changes = self._events.apply(self.kv.take_events())
        except Exception as e:  # events never take the engine down
            self._once("events", "dynblock tier: no KV events (%s: %s; logged once)",
                       type(e).__name__, e)
            return ()
        return [OffloadingEvent(keys=[OffloadKey(h)], removed=kind == "removed",
                                medium=Medium.CPU if tier == "host" else Medium.STORAGE,
                                ownership=self.tier_type)
                for kind, tier, h in changes]

    @classmethod
    def build_metric_definitions(cls, extra_config: Dict[str, Any]) -> Dict[str, Any]:
        """dynblock's families (:mod:`dynblock.vllm.metrics`), registered by
        vLLM's offloading connector on its ``/metrics``."""
        return metrics.offloading_definitions()

    def get_stats(self) -> Optional[Any]:
        """The store's counters since the last call and its gauges, as
        vLLM's ``OffloadingConnectorStats`` (None when closed or idle)."""
        if self.kv.closed:
            return None
        try:
            return metrics.offloading_stats(self._deltas.take(self.kv))
        except Exception as e:  # metrics never take the engine down
            self._once("stats", "dynblock tier: no metrics (%s: %s; logged once)",
                       type(e).__name__, e)
            return None
