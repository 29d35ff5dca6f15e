"""SGLang's HiCache keeps its L3 pages in dynblock.

SGLang's hierarchical cache moves KV pages GPU -> a host pool -> "L3" storage,
and loads third-party L3 backends through its ``dynamic`` storage backend::

    python -m sglang.launch_server ... --enable-hierarchical-cache \\
        --hicache-storage-backend dynamic \\
        --hicache-storage-backend-extra-config '{"backend_name": "dynblock",
            "module_path": "dynblock.sglang", "class_name": "DynblockHiCache",
            "interface_v1": 1, "disk_bytes": 68719476736}'

Every other key of the extra config is a :class:`dynblock.Config` field
(``DYNBLOCK_*`` variables apply, the extra config wins); an unknown key is
refused, naming it. ``block_size`` is derived from the host pool.

How pages are stored: SGLang's host pool names, for each page, the pieces of
memory that hold it (``get_page_buffer_meta``: K and V of each page, or of
each layer of it, or one piece for MLA). Each piece is one dynblock block, moved
straight between the host pool and the tiers (``rows`` of the pool's buffer:
no copy in Python, the GIL released, one call per batch). A page is present
when all its pieces are. Keys are SGLang's page keys hashed with an identity of
everything that gives the bytes their meaning: the model, the rank's shard
(TP rank and size for MHA, none for MLA, whose ranks hold the same bytes; PP,
CP and DCP ranks), the host layout, the dtype and the piece geometry, so
another model, shard or layout misses instead of loading wrong bytes.

Each rank is its own process and opens its own store: with ``persist=True``
the rank's store is ``disk_path`` plus a suffix naming its shard
(``.tp0of2``, ``.mla``, ...), so ranks never contend for one store.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Any, Deque, Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np

from . import _core
from ._once import LogOnce
from .config import Config, split_engine_config
from .manager import BlockManager
from .store import Reader

try:
    import torch
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig
except ImportError as _e:  # pragma: no cover - exercised without SGLang
    raise ImportError(
        f"dynblock.sglang needs SGLang (sglang.srt.mem_cache.hicache_storage) and torch: {_e}"
    ) from _e

log = logging.getLogger("dynblock.sglang")

__all__ = ["DynblockHiCache", "SGLANG_KEYS", "SUPPORTED_LAYOUTS"]

#: Extra-config keys that are SGLang's own (how it finds this class).
SGLANG_KEYS = ("backend_name", "module_path", "class_name", "interface_v1")
#: Host-pool layouts whose pages this backend moves. Each keeps every piece of
#: a page in one buffer, in pieces of one size.
SUPPORTED_LAYOUTS = ("page_first", "page_first_direct", "layer_first")
#: Per-operation records kept for get_stats() between two calls (bounded).
_STATS_KEPT = 4096

def split_extra_config(extra: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """SGLang's ``--hicache-storage-backend-extra-config`` -> ``Config`` fields;
    unknown keys and the fields derived from the host pool raise ``ValueError``."""
    fields, _ = split_engine_config(extra, where="hicache storage extra config", own=SGLANG_KEYS,
                                    own_are="one of SGLang's keys",
                                    derived_from="SGLang's host pool")
    return fields


def shard_tag(cfg: HiCacheStorageConfig) -> str:
    """The name of the shard of the KV cache this rank holds: MHA ranks hold
    their own heads (``tp0of2``); MLA ranks all hold the same bytes (``mla``).
    Pipeline, context and decode-context parallel ranks are added when used,
    and with DP attention the DP rank (its TP rank is local to its group)."""
    tag = "mla" if cfg.is_mla_model else f"tp{cfg.tp_rank}of{cfg.tp_size}"
    if not cfg.is_mla_model and cfg.dp_rank:
        tag += f"-dp{cfg.dp_rank}"
    if cfg.pp_size > 1:
        tag += f"-pp{cfg.pp_rank}of{cfg.pp_size}"
    if cfg.attn_cp_size > 1:
        tag += f"-cp{cfg.attn_cp_rank}of{cfg.attn_cp_size}"
    if cfg.dcp_size > 1:
        tag += f"-dcp{cfg.dcp_rank}of{cfg.dcp_size}-page{cfg.logical_page_size}"
    return tag


@dataclasses.dataclass(frozen=True)
class PageGeometry:
    """Where a host pool keeps one page: ``pieces`` pieces of ``piece_bytes``
    in the pool's buffer, and the order of those pieces in SGLang's flat data
    page (``flat_order[f]`` is the piece at chunk ``f`` of the flat page)."""

    layout: str
    page_tokens: int
    pieces: int
    piece_bytes: int
    dtype: str
    flat_order: Tuple[int, ...]


def page_geometry(pool: Any) -> PageGeometry:
    """Read a host pool's page geometry through the interface SGLang's pools
    give storage backends; raises ``ValueError`` naming what is not supported."""
    layout = getattr(pool, "layout", None)
    if layout not in SUPPORTED_LAYOUTS:
        raise ValueError(f"dynblock.sglang: host pool layout {layout!r} is not supported; use "
                         f"--hicache-mem-layout {' or '.join(SUPPORTED_LAYOUTS)}")
    buf = getattr(pool, "kv_buffer", None)
    if not isinstance(buf, torch.Tensor):
        raise ValueError(f"dynblock.sglang: the {type(pool).__name__} host pool keeps its pages in "
                         "several buffers; only pools with one kv_buffer are supported")
    if buf.device.type != "cpu" or not buf.is_contiguous():
        raise ValueError(f"dynblock.sglang: the host pool's buffer must be contiguous host memory "
                         f"(it is on {buf.device}, contiguous={buf.is_contiguous()})")
    page = int(pool.page_size)
    ptrs, sizes = pool.get_page_buffer_meta(torch.arange(page, dtype=torch.int64))
    if not ptrs or len(set(int(s) for s in sizes)) != 1:
        raise ValueError(f"dynblock.sglang: a page of the {layout} host pool is in pieces of "
                         f"sizes {sorted(set(int(s) for s in sizes))}; only equal pieces are supported")
    piece = int(sizes[0])
    base = buf.data_ptr()
    offs = [int(p) - base for p in ptrs]
    if any(o % piece for o in offs):
        raise ValueError(f"dynblock.sglang: the {layout} host pool's pieces are not aligned to "
                         f"their size ({piece} bytes)")
    # The flat data page (get_data_page(flat=True)) in chunks of one piece: which piece is
    # each chunk? Follow the unflattened view's strides to each chunk's address.
    view = pool.get_data_page(0, flat=False)
    isz = view.element_size()
    if piece % isz or view.numel() * isz != piece * len(ptrs):
        raise ValueError(f"dynblock.sglang: the {layout} host pool's data page does not match "
                         "its buffer pieces")
    shape, stride = list(view.shape), list(view.stride())
    chunk = piece // isz
    where = {o: i for i, o in enumerate(offs)}
    order = []
    for f in range(len(ptrs)):
        rem, addr = f * chunk, view.data_ptr() - base
        for d in range(len(shape) - 1, -1, -1):
            rem, idx = divmod(rem, shape[d])
            addr += idx * stride[d] * isz
        if addr not in where:
            raise ValueError(f"dynblock.sglang: chunk {f} of the {layout} host pool's flat page "
                             "is not one of its buffer pieces")
        order.append(where[addr])
    if sorted(order) != list(range(len(ptrs))):
        raise ValueError(f"dynblock.sglang: the {layout} host pool's flat page repeats pieces")
    return PageGeometry(layout=layout, page_tokens=page, pieces=len(ptrs), piece_bytes=piece,
                        dtype=str(pool.dtype).replace("torch.", ""), flat_order=tuple(order))


class _Store(Protocol):
    """What the backend uses of a store: a BlockManager, or a _Follower."""

    def put(self, hashes: Any, src: Any, rows: Any = None) -> int: ...
    def match(self, hashes: Any) -> int: ...
    def get_each(self, hashes: Any, dst: Any, rows: Any = None) -> List[bool]: ...
    def clear(self) -> None: ...
    def sync(self) -> None: ...
    def stats(self) -> Dict[str, Any]: ...
    def close(self) -> None: ...


class _Follower:
    """A rank that reads the writer rank's store (:class:`dynblock.store.Reader`)
    and stores nothing."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader

    def put(self, hashes: Any, src: Any, rows: Any = None) -> int:
        raise PermissionError("this rank reads the writer rank's store; only the writer stores")

    def match(self, hashes: Any) -> int:
        return self.reader.match(hashes.tolist() if hasattr(hashes, "tolist") else list(hashes))

    def get_each(self, hashes: Any, dst: Any, rows: Any = None) -> List[bool]:
        hs = hashes.tolist() if hasattr(hashes, "tolist") else list(hashes)
        rs = list(range(len(hs))) if rows is None else \
            (rows.tolist() if hasattr(rows, "tolist") else list(rows))
        return self.reader.get_each(hs, dst, rs)

    def clear(self) -> None:
        """Nothing: the pages are the writer's."""

    def sync(self) -> None:
        """Nothing: the pages are the writer's."""

    def stats(self) -> Dict[str, Any]:
        r = self.reader
        return {"reader_blocks": r.blocks, "reader_refreshes": r.refreshes,
                "reader_failed_blocks": r.failed}

    def close(self) -> None:
        self.reader.close()


class DynblockHiCache(HiCacheStorage):
    """SGLang's L3 storage in dynblock: see the module docs. Created by
    SGLang's ``StorageBackendFactory`` (``dynamic``); the store opens when
    SGLang registers its host pool."""

    def __init__(self, storage_config: HiCacheStorageConfig, *_args: Any, **_kwargs: Any) -> None:
        self.storage_config = storage_config
        self._fields = split_extra_config(storage_config.extra_config)
        self.kv: Optional[_Store] = None
        self.geometry: Optional[PageGeometry] = None
        self._lock = threading.Lock()
        self._ident = b""
        self._buf: Optional[np.ndarray] = None
        self._base = 0
        self._rows = 0
        # get_stats(): pages and GiB/s of each batch get/set since the last call.
        self._prefetch: Deque[Tuple[int, float]] = collections.deque(maxlen=_STATS_KEPT)
        self._backup: Deque[Tuple[int, float]] = collections.deque(maxlen=_STATS_KEPT)
        self.failed_pages = 0
        self._once = LogOnce(log)
        # MLA ranks hold the same bytes and only the writer rank stores them; SGLang takes the
        # lowest hit count of all ranks, so the others must hit the writer's pages: they follow
        # the writer's persistent store read-only.
        self.follower = storage_config.is_mla_model and not storage_config.is_storage_writer
        if self.follower and not (self._fields.get("persist") and self._fields.get("disk_path")):
            raise ValueError(
                f"dynblock.sglang: MLA rank {storage_config.tp_rank} of {storage_config.tp_size} "
                "reads the pages the writer rank stores, from the writer's persistent store: give "
                "\"persist\": true and a \"disk_path\" in the extra config")

    # --- opening ------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        geo = page_geometry(mem_pool_host)
        cfg = self.storage_config
        ident = "/".join(str(x) for x in (
            "dynblock.sglang/1", cfg.model_name or "", shard_tag(cfg), geo.layout, geo.page_tokens,
            geo.pieces, geo.piece_bytes, geo.dtype))
        fields = dict(self._fields)
        if fields.get("disk_path"):
            fields["disk_path"] = f"{fields['disk_path']}.{shard_tag(cfg)}"
        try:
            config = Config.from_env(**fields, block_size=geo.piece_bytes)
        except ValueError as e:
            raise ValueError(f"dynblock.sglang: hicache storage extra config: {e}") from None
        buf = mem_pool_host.kv_buffer
        with self._lock:
            if self.kv is not None:
                self.kv.close()
            try:
                self.kv = _Follower(Reader(str(config.disk_path), geo.piece_bytes)) \
                    if self.follower else BlockManager(config)
            except ValueError as e:
                raise ValueError(
                    f"dynblock.sglang: this rank's pages are {geo.pieces} x {geo.piece_bytes} bytes "
                    f"({geo.layout}, {geo.dtype}) and its store refuses them (made for another "
                    f"model, layout or page size? give another disk_path): {e}") from None
            self.geometry = geo
            self._ident = ident.encode()
            self._buf = buf.view(torch.uint8).reshape(-1).numpy()
            self._base = buf.data_ptr()
            self._rows = self._buf.nbytes // geo.piece_bytes
        log.info("dynblock.sglang: %s pages of %d x %d bytes (%s), store %s%s", geo.layout,
                 geo.pieces, geo.piece_bytes, shard_tag(cfg), config.disk_path or config.disk_dir,
                 " (read-only: the writer rank's)" if self.follower else "")

    def _kv(self) -> "_Store":
        kv = self.kv
        if kv is None:
            raise RuntimeError("dynblock.sglang: no host pool registered yet "
                               "(SGLang calls register_mem_pool_host first)")
        return kv

    # --- keys -----------------------------------------------------------------
    def _hashes(self, keys: Sequence[str], order: Optional[Sequence[int]] = None) -> np.ndarray:
        """The dynblock keys of every piece of every page, page after page, pieces
        in buffer order (or in ``order``): ``_core.piece_keys`` of SGLang's page
        keys in this store's identity."""
        geo = self.geometry
        assert geo is not None
        keys = list(keys)
        if not all(isinstance(k, str) for k in keys):
            raise TypeError("keys must be str (SGLang's page keys), got "
                            f"{sorted({type(k).__name__ for k in keys if not isinstance(k, str)})}")
        pieces = list(range(geo.pieces)) if order is None else list(order)
        return np.frombuffer(_core.piece_keys(keys, self._ident, pieces), dtype=np.uint64)

    def _rows_of(self, host_indices: Any, n_pages: int) -> np.ndarray:
        geo = self.geometry
        assert geo is not None
        idx = host_indices if isinstance(host_indices, torch.Tensor) else torch.as_tensor(host_indices)
        if idx.numel() != n_pages * geo.page_tokens:
            raise ValueError(f"host_indices has {idx.numel()} entries; {n_pages} pages of "
                             f"{geo.page_tokens} tokens need {n_pages * geo.page_tokens}")
        ptrs, _ = self.mem_pool_host.get_page_buffer_meta(idx.cpu())
        off = np.asarray(ptrs, dtype=np.int64) - self._base
        rows = off // geo.piece_bytes
        if off.size != n_pages * geo.pieces or (off % geo.piece_bytes).any() \
                or (rows < 0).any() or (rows >= self._rows).any():
            raise ValueError("host_indices name memory outside the registered host pool")
        return rows

    # --- the zero-copy page interface -------------------------------------------
    def batch_set_v1(self, keys: List[str], host_indices: Any, extra_info: Any = None) -> List[bool]:
        if not keys:
            return []
        kv = self._kv()
        if self.follower:
            return [False] * len(keys)  # only the writer rank stores (SGLang skips the others)
        t0 = time.perf_counter()
        try:
            kv.put(self._hashes(keys), self._buf, self._rows_of(host_indices, len(keys)))
        except (OSError, RuntimeError) as e:
            self._failed(len(keys), f"storing {len(keys)} pages failed: {e}")
            return [False] * len(keys)
        self._record(self._backup, len(keys), t0)
        return [True] * len(keys)

    def batch_get_v1(self, keys: List[str], host_indices: Any, extra_info: Any = None) -> List[bool]:
        if not keys:
            return []
        kv, geo = self._kv(), self.geometry
        assert geo is not None
        t0 = time.perf_counter()
        try:
            ok = kv.get_each(self._hashes(keys), self._buf, self._rows_of(host_indices, len(keys)))
        except (OSError, RuntimeError) as e:
            self._failed(len(keys), f"loading {len(keys)} pages failed: {e}")
            return [False] * len(keys)
        arrived = np.asarray(ok, dtype=bool).reshape(len(keys), geo.pieces)
        res = [bool(row.all()) for row in arrived]
        got = sum(res)
        if got < len(keys):
            self._failed(len(keys) - got, f"{len(keys) - got} of {len(keys)} pages did not load "
                         "(evicted since, failed their checksum, or unreadable)")
        self._record(self._prefetch, got, t0)
        return res

    def batch_exists(self, keys: List[str], extra_info: Any = None) -> int:
        """How many leading pages of ``keys`` the store holds (all their
        pieces); answered from the index, without waiting for disk I/O."""
        if not keys:
            return 0
        kv, geo = self._kv(), self.geometry
        assert geo is not None
        return int(kv.match(self._hashes(keys))) // geo.pieces

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    # --- the generic interface (flat data pages) -------------------------------
    def _flat(self, t: Any) -> np.ndarray:
        geo = self.geometry
        assert geo is not None
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or not t.is_contiguous():
            raise TypeError("a data page must be a contiguous CPU tensor")
        arr = t.view(torch.uint8).reshape(-1).numpy()
        if arr.nbytes != geo.pieces * geo.piece_bytes:
            raise ValueError(f"a data page is {geo.pieces * geo.piece_bytes} bytes, got {arr.nbytes}")
        return arr

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> Any:
        kv, geo = self._kv(), self.geometry
        assert geo is not None
        if target_location is None:
            target_location = self.mem_pool_host.get_dummy_flat_data_page()
        try:
            ok = kv.get_each(self._hashes([key], geo.flat_order), self._flat(target_location))
        except (OSError, RuntimeError) as e:
            self._failed(1, f"loading page {key} failed: {e}")
            return None
        if all(ok):
            return target_location
        self._failed(1, f"page {key} did not load (evicted since, failed its checksum, or unreadable)")
        return None

    def batch_get(self, keys: List[str], target_locations: Any = None,
                  target_sizes: Any = None) -> List[Any]:
        t0 = time.perf_counter()
        locs = target_locations or [None] * len(keys)
        out = [self.get(k, t) for k, t in zip(keys, locs)]
        self._record(self._prefetch, sum(o is not None for o in out), t0)
        return out

    def set(self, key: str, value: Any = None, target_location: Any = None,
            target_sizes: Any = None) -> bool:
        kv, geo = self._kv(), self.geometry
        assert geo is not None
        if self.follower:
            return False  # only the writer rank stores (SGLang skips the others)
        try:
            kv.put(self._hashes([key], geo.flat_order), self._flat(value.contiguous()))
        except (OSError, RuntimeError) as e:
            self._failed(1, f"storing page {key} failed: {e}")
            return False
        return True

    def batch_set(self, keys: List[str], values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:
        t0 = time.perf_counter()
        ok = [self.set(k, v) for k, v in zip(keys, values)]
        self._record(self._backup, sum(ok), t0)
        return all(ok)

    # --- housekeeping -----------------------------------------------------------
    def clear(self) -> bool:  # type: ignore[override]
        """Drop every page this rank's store holds."""
        if self.kv is not None:
            self.kv.clear()
        return True

    def close(self) -> None:
        """Flush and close the store (a persistent one keeps its pages)."""
        with self._lock:
            kv, self.kv = self.kv, None
        if kv is not None:
            kv.close()

    def get_stats(self) -> Any:
        """SGLang's ``StorageMetrics``: pages and GiB/s of each batch load and
        store since the last call."""
        from sglang.srt.observability.metrics_collector import StorageMetrics

        m = StorageMetrics()
        for q, pages, bw in ((self._prefetch, m.prefetch_pgs, m.prefetch_bandwidth),
                             (self._backup, m.backup_pgs, m.backup_bandwidth)):
            while q:
                n, gibs = q.popleft()
                pages.append(n)
                bw.append(gibs)
        return m

    def stats(self) -> Dict[str, Any]:
        """The store's own counters (``BlockManager.stats()``) plus
        ``failed_pages``: pages a load asked for that did not arrive (evicted
        since SGLang's lookup, failed their checksum, or unreadable)."""
        s = dict(self.kv.stats()) if self.kv is not None else {}
        s["failed_pages"] = self.failed_pages
        return s

    def _record(self, q: Deque[Tuple[int, float]], pages: int, t0: float) -> None:
        geo = self.geometry
        assert geo is not None
        dt = max(time.perf_counter() - t0, 1e-9)
        q.append((pages, pages * geo.pieces * geo.piece_bytes / dt / (1 << 30)))

    def _failed(self, pages: int, why: str) -> None:
        self.failed_pages += pages
        self._once("failed", "dynblock.sglang: %s (SGLang recomputes those pages; later failures "
                   "are counted in stats()['failed_pages'])", why)
