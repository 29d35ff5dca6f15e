"""``DynblockConnector``: vLLM's KV connector (``KVConnectorBase_V1``) on a
dynblock store. See :mod:`dynblock.vllm` for how to enable it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Set, Tuple

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from ..config import Config
from . import metrics, stats
from .._once import LogOnce
from .events import BlockEvents, watch as watch_events
from .keys import socket_path
from .service import LookupClient, LookupServer
from .store import LayerStore, row_view, split_extra_config

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("dynblock.vllm")

@dataclass
class LoadSpec:
    req_id: str
    hashes: List[bytes]
    block_ids: List[int]
    #: The request's tenant (its ``cache_salt``): the store namespace of its blocks.
    namespace: Optional[str] = None


@dataclass
class SaveSpec:
    hashes: List[bytes]
    block_ids: List[int]
    namespace: Optional[str] = None


def namespace_of(request: "Request") -> Optional[str]:
    """The store namespace of a request's blocks: its ``cache_salt`` (vLLM's
    per-tenant cache isolation), None (the shared namespace) without one."""
    salt = getattr(request, "cache_salt", None)
    return salt if isinstance(salt, str) and salt else None


@dataclass
class DynblockMetadata(KVConnectorMetadata):
    """What the scheduler tells the workers each step: blocks to load before
    the forward pass (leased by the lookup) and full blocks to save after it."""

    loads: List[LoadSpec] = field(default_factory=list)
    saves: List[SaveSpec] = field(default_factory=list)


@dataclass
class _Req:
    request: "Request"
    block_ids: List[int] = field(default_factory=list)
    saved: int = 0  # leading blocks already sent to the store


class DynblockConnector(KVConnectorBase_V1):
    """vLLM KV connector that offloads full KV blocks to dynblock's host and
    disk tiers and loads a request's longest stored prefix back.

    Scheduler side: asks the worker's lookup service (a Unix socket, see
    :mod:`dynblock.vllm.service`) how many of the request's full blocks are
    stored, leased until the load. Worker side: opens the store when vLLM
    registers its KV caches, loads leased blocks layer by layer before each
    layer's attention runs, and saves newly full blocks of each layer while
    later layers compute (waiting for those copies at the end of the step)."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "Optional[KVCacheConfig]" = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self._cfg_fields, opts = split_extra_config(extra)
        self._block_tokens = int(vllm_config.cache_config.block_size)
        self._identity = str(vllm_config.instance_id or os.getpid())
        self._world = int(vllm_config.parallel_config.world_size)
        self._timeout = float(opts["lookup_timeout_ms"]) / 1000.0
        self._lease_ttl = float(opts["lease_ttl_s"])
        self._mla = bool(getattr(vllm_config.model_config, "use_mla", False))
        self._num_blocks = int(getattr(kv_cache_config, "num_blocks", 0) or 0)
        if (self._kv_transfer_config.kv_load_failure_policy or "fail") != "recompute":
            log.warning("dynblock: kv_load_failure_policy is %r: a block that fails to load "
                        "(a disk read error, a checksum mismatch) fails its request; set "
                        "kv_load_failure_policy='recompute' so vLLM recomputes it instead",
                        self._kv_transfer_config.kv_load_failure_policy)
        # scheduler side
        self._clients: List[LookupClient] = []
        self._reqs: Dict[str, _Req] = {}
        self._leased: Dict[str, Tuple[int, int]] = {}  # req_id -> (skip, count) of the lookup
        self._loads: List[LoadSpec] = []
        # worker side
        self._store: Optional[LayerStore] = None
        self._server: Optional[LookupServer] = None
        self._layers: Dict[str, int] = {}
        self._caches: Dict[str, Any] = {}
        self._zero_copy: Dict[str, Tuple[bool, int]] = {}
        self._load_jobs: Dict[str, List[Tuple[Any, List[int]]]] = {}
        self._save_jobs: List[Any] = []
        self._load_errors: Set[int] = set()
        self._events: Optional[BlockEvents] = None
        self._kv_events: List[Any] = []  # scheduler side: events of every worker, in order
        self._once = LogOnce(log)
        self.counters = {"loaded_blocks": 0, "load_errors": 0, "saved_blocks": 0,
                         "save_errors": 0}
        if role == KVConnectorRole.SCHEDULER:
            self._clients = [LookupClient(socket_path(self._identity, r), timeout=self._timeout)
                             for r in range(self._world)]

    # ==================== scheduler side ====================
    def on_new_request(self, request: "Request") -> None:
        self._reqs[request.request_id] = _Req(request)

    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> Tuple[Optional[int], bool]:
        bs = self._block_tokens
        rid = request.request_id
        # A new lookup for the request replaces its earlier lease on the worker.
        self._leased.pop(rid, None)
        # Leave at least one token to compute: vLLM needs a last token to sample from.
        usable = min(len(request.block_hashes), (request.num_tokens - 1) // bs)
        skip = num_computed_tokens // bs
        if usable <= skip or not self._clients:
            return 0, False
        hashes = [bytes(h) for h in request.block_hashes[skip:usable]]
        ns = namespace_of(request)
        counts = [c.lookup(rid, hashes, ns) for c in self._clients]
        count = min(counts)
        if count == 0:
            if any(counts):  # another rank holds a lease this request will not use
                for c in self._clients:
                    c.release(rid)
            return 0, False
        self._leased[rid] = (skip, count)
        return count * bs, False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        rid = request.request_id
        lease = self._leased.pop(rid, None)
        if lease is None:
            return
        skip, count = lease
        n = min(num_external_tokens // self._block_tokens, count)
        if n <= 0:
            for c in self._clients:
                c.release(rid)
            return
        ids = list(blocks.get_block_ids()[0][skip:skip + n])
        hashes = [bytes(h) for h in request.block_hashes[skip:skip + n]]
        self._loads.append(LoadSpec(rid, hashes, ids, namespace_of(request)))

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = DynblockMetadata(loads=self._loads)
        self._loads = []
        sched = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            self._add_saves(meta, st, new.num_computed_tokens + sched.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            st = self._reqs.get(rid)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:
                st.block_ids = list(new_ids[0]) if new_ids is not None else []
            elif new_ids is not None:
                st.block_ids.extend(new_ids[0])
            self._add_saves(meta, st, cached.num_computed_tokens[i] + sched.get(rid, 0))
        return meta

    def _add_saves(self, meta: DynblockMetadata, st: _Req, computed: int) -> None:
        full = min(len(st.request.block_hashes), computed // self._block_tokens, len(st.block_ids))
        if full > st.saved:
            meta.saves.append(SaveSpec([bytes(h) for h in st.request.block_hashes[st.saved:full]],
                                       st.block_ids[st.saved:full], namespace_of(st.request)))
            st.saved = full

    def request_finished(self, request: "Request",
                         block_ids: List[int]) -> Tuple[bool, Optional[Dict[str, Any]]]:
        rid = request.request_id
        self._reqs.pop(rid, None)
        if self._leased.pop(rid, None) is not None:
            for c in self._clients:
                c.release(rid)
        return False, None

    # ==================== worker side ====================
    def register_kv_caches(self, kv_caches: Dict[str, Any]) -> None:
        try:
            self._open(kv_caches)
        except Exception as e:
            self._store = None
            log.error("dynblock: the connector is off (no hits, no saves): %s: %s",
                      type(e).__name__, e)

    def _open(self, kv_caches: Dict[str, Any]) -> None:
        from vllm.distributed.parallel_state import get_world_group

        names = list(kv_caches)
        if not names:
            raise ValueError("vLLM registered no KV caches")
        first = kv_caches[names[0]]
        num_blocks = self._num_blocks or int(first.shape[0])
        for n in names:
            t = kv_caches[n]
            if tuple(t.shape) != tuple(first.shape) or t.dtype != first.dtype:
                raise ValueError(f"layer {n} has KV shape {tuple(t.shape)} {t.dtype}, layer "
                                 f"{names[0]} {tuple(first.shape)} {first.dtype}: one store needs "
                                 "one layout (hybrid models are not supported yet)")
        zc, bd, why = row_view(first, num_blocks)
        row_shape = [int(d) for i, d in enumerate(first.shape) if i != bd]
        dtype = str(first.dtype).replace("torch.", "")
        layout = LayerStore.layout_for(len(names), self._block_tokens, row_shape, dtype, self._mla)
        fields = dict(self._cfg_fields)
        rank = get_world_group().rank if self._world > 1 else 0
        if self._world > 1 and fields.get("disk_path"):
            fields["disk_path"] = f"{fields['disk_path']}.rank{rank}"
        cfg = Config.from_env(**fields, layout=layout)
        self._store = LayerStore(cfg, lease_ttl_s=self._lease_ttl)
        self._deltas = stats.Deltas(rank)
        ev = getattr(self._vllm_config, "kv_events_config", None)
        if ev is not None and ev.enable_kv_cache_events:
            # KV events: the store's tier changes, per vLLM block (events.py)
            self._events = watch_events(self._store.kv, len(names))
        self._layers = {n: i for i, n in enumerate(names)}
        self._caches = dict(kv_caches)
        for n in names:
            z, b, _ = row_view(kv_caches[n], num_blocks)
            self._zero_copy[n] = (z, b)
        if not zc:
            log.info("dynblock: KV moves through a staging copy: %s", why)
        self._server = LookupServer(socket_path(self._identity, rank), self._store.lookup,
                                    self._store.release)
        log.info("dynblock: store open for %d layers x %d blocks of %d bytes (%s); lookups at %s",
                 len(names), num_blocks, layout.block_size, self._store.kv.stats().get("disk") and
                 "host+disk" or "host", self._server.path)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if self._store is None or not isinstance(meta, DynblockMetadata):
            return
        for spec in meta.loads:
            held = self._store.take(spec.req_id)
            n = len(spec.block_ids)
            use_leases = held is not None and held.count == n
            if held is not None and not use_leases:
                for le in held.leases:
                    le.release()
            for name, layer in self._layers.items():
                tensor = self._caches[name]
                zc, bd = self._zero_copy[name]
                src = held.leases[layer] if use_leases and held is not None else spec.hashes
                try:
                    job = self._store.load(layer, src, tensor, spec.block_ids, zc, bd,
                                           hashes=spec.hashes, namespace=spec.namespace)
                except Exception as e:
                    self._load_failed(spec.block_ids, e)
                    continue
                self._load_jobs.setdefault(name, []).append((job, spec.block_ids))

    def _load_failed(self, block_ids: List[int], e: Optional[BaseException]) -> None:
        self._load_errors.update(block_ids)
        self.counters["load_errors"] += len(block_ids)
        self._once("load", "dynblock: %d block(s) could not be loaded (%s); vLLM recomputes them "
                   "(logged once)", len(block_ids), e if e else "missing or unreadable")

    def _finish_loads(self, name: str) -> None:
        for job, ids in self._load_jobs.pop(name, []):
            try:
                ok = job.wait()
            except Exception as e:
                self._load_failed(ids, e)
                continue
            self.counters["loaded_blocks"] += sum(ok)
            missing = [b for b, a in zip(ids, ok) if not a]
            if missing:  # only those: the blocks after a bad one arrived and count
                self._load_failed(missing, None)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._finish_loads(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any,
                      **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if self._store is None or not isinstance(meta, DynblockMetadata) or not meta.saves:
            return
        layer = self._layers.get(layer_name)
        if layer is None:
            return
        zc, bd = self._zero_copy[layer_name]
        # One put per namespace (the requests' tenants), in the order they first come.
        groups: Dict[Optional[str], Tuple[List[bytes], List[int]]] = {}
        for s in meta.saves:
            hs, rs = groups.setdefault(s.namespace, ([], []))
            hs += s.hashes
            rs += s.block_ids
        for ns, (hashes, rows) in groups.items():
            try:
                keys = self._store.keys(hashes, layer)
                if self._events is not None:
                    self._events.saved(hashes, layer, keys, ns)
                self._save_jobs.append(self._store.save(layer, hashes, kv_layer, rows, zc, bd, keys,
                                                        namespace=ns))
            except Exception as e:
                self.counters["save_errors"] += len(rows)
                self._once("save", "dynblock: saving KV failed (%s: %s); the engine goes on "
                           "without those blocks (logged once)", type(e).__name__, e)

    def wait_for_save(self) -> None:
        # Source rows must stay untouched until read: vLLM may reuse them next step.
        jobs, self._save_jobs = self._save_jobs, []
        for job in jobs:
            try:
                self.counters["saved_blocks"] += job.wait()
            except Exception as e:
                self.counters["save_errors"] += 1
                self._once("save", "dynblock: saving KV failed (%s: %s); the engine goes on "
                           "without those blocks (logged once)", type(e).__name__, e)

    def get_block_ids_with_load_errors(self) -> Set[int]:
        for name in list(self._load_jobs):
            self._finish_loads(name)
        errors, self._load_errors = self._load_errors, set()
        return errors

    # ==================== metrics (vLLM's /metrics) ====================
    def get_kv_connector_stats(self) -> Any:
        """Worker side: the store's counters since the last call and its
        gauges (:mod:`dynblock.vllm.metrics`); None on the scheduler side."""
        if self._store is None:
            return None
        try:
            st = metrics.build_stats(self._deltas.take(self._store.kv))
        except Exception as e:  # metrics never take the engine down
            self._once("stats", "dynblock: no metrics this step (%s: %s; logged once)",
                       type(e).__name__, e)
            return None
        return None if st.is_empty() else st

    # ==================== KV events (vLLM's --kv-events-config) ====================
    def get_kv_connector_kv_cache_events(self) -> Optional[metrics.DynblockKVEvents]:
        """Worker side: the vLLM blocks stored into and removed from the
        store's tiers since the last call (:mod:`dynblock.vllm.events`)."""
        if self._store is None or self._events is None:
            return None
        try:
            out = metrics.kv_events(self._events.apply(self._store.kv.take_events()),
                                    self._block_tokens)
        except Exception as e:  # events never take the engine down
            self._once("events", "dynblock: no KV events this step (%s: %s; logged once)",
                       type(e).__name__, e)
            return None
        if not out:
            return None
        batch = metrics.DynblockKVEvents(num_workers=1)
        batch.add_events(out)
        return batch

    def update_connector_output(self, connector_output: Any) -> None:
        """Scheduler side: keep the workers' events for :meth:`take_events`."""
        got = getattr(connector_output, "kv_cache_events", None)
        if isinstance(got, metrics.DynblockKVEvents):
            self._kv_events += got.aggregate().get_all_events()

    def take_events(self) -> Iterable[Any]:
        """Scheduler side: the events every worker reported, for vLLM's publisher."""
        out, self._kv_events = self._kv_events, []
        return out

    @classmethod
    def build_kv_connector_stats(cls, data: Optional[Dict[str, Any]] = None) -> Any:
        return metrics.build_stats(data)

    @classmethod
    def build_prom_metrics(cls, vllm_config: "VllmConfig", metric_types: Any, labelnames: List[str],
                           per_engine_labelvalues: Dict[int, List[object]]) -> Any:
        return metrics.DynblockPromMetrics(vllm_config, metric_types, labelnames,
                                           per_engine_labelvalues)

    def shutdown(self) -> None:
        for c in self._clients:
            c.close()
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._store is not None:
            for name in list(self._load_jobs):
                self._finish_loads(name)
            self.wait_for_save()
            self._store.close()
            self._store = None
