"""The ``sglang`` workload's measuring side, run with an interpreter that has
SGLang (see :mod:`dynblock.bench.sglang`): ``python -m
dynblock.bench.sglang_run JSON`` prints one ``RESULT`` line of JSON.

Also the CPU host pools the SGLang tests use: SGLang's own
``MHATokenToKVPoolHost`` / ``MLATokenToKVPoolHost`` over CPU memory, built
from device-side buffer descriptions as SGLang's KV cache builder would."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import time
import warnings
from typing import Any, Dict, List

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from sglang.srt.mem_cache.device_pool_info import (  # noqa: E402
    KVBufferLayout, KVBuffers, MHABufferInfo, MLABufferInfo)
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig  # noqa: E402
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost  # noqa: E402
from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost  # noqa: E402
from sglang.srt.mem_cache.storage import StorageBackendFactory  # noqa: E402

from .common import cpu_seconds, drop_caches  # noqa: E402


def mha_pool(layout: str, pages: int, page: int = 16, layers: int = 2, heads: int = 2,
             dim: int = 64, dtype: torch.dtype = torch.bfloat16) -> MHATokenToKVPoolHost:
    """SGLang's MHA host pool on CPU with room for ``pages`` pages (twice the
    device pool described to it)."""
    tokens = pages * page // 2
    k = tuple(torch.zeros(tokens + page, heads, dim, dtype=dtype) for _ in range(layers))
    v = tuple(torch.zeros(tokens + page, heads, dim, dtype=dtype) for _ in range(layers))
    ptrs = [torch.tensor([t.data_ptr() for t in x], dtype=torch.uint64) for x in (k, v)]
    info = MHABufferInfo(buffers=KVBuffers(k=k, v=v, k_data_ptrs=ptrs[0], v_data_ptrs=ptrs[1],
                                           layout=KVBufferLayout.NHD),
                         page_size=page, head_num=heads, head_dim=dim, v_head_dim=dim,
                         dtype=dtype, device=torch.device("cpu"))
    return MHATokenToKVPoolHost(info, 2.0, 0, page, layout, pin_memory=False, device="cpu",
                                device_capacity_tokens=tokens, start_layer=0, end_layer=layers)


def mla_pool(layout: str, pages: int, page: int = 16, layers: int = 2, lora: int = 64,
             rope: int = 16, dtype: torch.dtype = torch.bfloat16) -> MLATokenToKVPoolHost:
    """SGLang's MLA host pool on CPU with room for ``pages`` pages."""
    tokens = pages * page // 2
    bufs = tuple(torch.zeros(tokens + page, 1, lora + rope, dtype=dtype) for _ in range(layers))
    info = MLABufferInfo(buffers=bufs, data_ptrs=torch.tensor([b.data_ptr() for b in bufs],
                                                              dtype=torch.uint64),
                         layer_indices=tuple(range(layers)), device_layer_num=layers,
                         page_size=page, kv_lora_rank=lora, qk_rope_head_dim=rope,
                         kv_cache_dim=lora + rope, dtype=dtype, device=torch.device("cpu"))
    return MLATokenToKVPoolHost(info, 2.0, 0, page, layout, pin_memory=False, device="cpu",
                                device_capacity_tokens=tokens, start_layer=0, end_layer=layers,
                                target_layer_num=layers)


def storage_config(extra: Dict[str, Any], model: str = "bench/model", mla: bool = False,
                   tp_rank: int = 0, tp_size: int = 1, layout: str = "page_first") -> HiCacheStorageConfig:
    return HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=mla, enable_storage_metrics=True,
        is_page_first_layout=layout.startswith("page_first"), model_name=model, extra_config=extra)


def dynblock_extra(**config: Any) -> Dict[str, Any]:
    """SGLang's extra config loading DynblockHiCache (zero-copy), plus ``config``."""
    return {"backend_name": "dynblock", "module_path": "dynblock.sglang",
            "class_name": "DynblockHiCache", "interface_v1": 1, **config}


def store_pages(backend: Any, pool: Any, keys: List[str], idx: torch.Tensor, v1: bool) -> bool:
    """Store pages as SGLang's cache controller does: ``batch_set_v1`` on host
    indices, or (the generic path) ``batch_set`` of ``get_data_page`` copies."""
    if v1:
        return all(backend.batch_set_v1(keys, idx))
    return bool(backend.batch_set(keys, [pool.get_data_page(idx[i * pool.page_size])
                                         for i in range(len(keys))]))


def load_pages(backend: Any, pool: Any, keys: List[str], idx: torch.Tensor, v1: bool) -> int:
    """Load pages as SGLang's cache controller does; returns how many leading
    pages arrived (the generic path copies each back with ``set_from_flat_data_page``)."""
    if v1:
        res = backend.batch_get_v1(keys, idx)
        return res.index(False) if False in res else len(res)
    got = backend.batch_get(keys, [pool.get_dummy_flat_data_page() for _ in keys]) or []
    n = 0
    while n < len(keys) and n < len(got) and got[n] is not None:
        pool.set_from_flat_data_page(idx[n * pool.page_size], got[n])
        n += 1
    return n


BATCH = 128  # SGLang's STORAGE_BATCH_SIZE
PAGE_TOKENS = 16
LAYER_BYTES = 2 * PAGE_TOKENS * 8 * 128 * 2  # K and V of 16 tokens x 8 heads x 128, bf16: 64 KiB


class _Impl:
    """One backend on one pool, moving pages as SGLang's controller does
    (dynblock: the zero-copy v1 interface; HiCacheFile: the generic one)."""

    def __init__(self, kind: str, pool: Any, d: str, nbytes: int) -> None:
        self.kind, self.pool = kind, pool
        if kind == "file":
            self.b = StorageBackendFactory.create_backend(
                "file", storage_config({"file_storage_path": d}), pool)
        else:
            os.makedirs(d, exist_ok=True)
            extra = dynblock_extra(host_blocks=0, disk_bytes=nbytes, persist=True,
                                   disk_path=os.path.join(d, "l3.kv"))
            self.b = StorageBackendFactory.create_backend("dynamic", storage_config(extra), pool)
        self.b.register_mem_pool_host(pool)

    def idx(self, first_page: int, n: int) -> torch.Tensor:
        return torch.arange(first_page * PAGE_TOKENS, (first_page + n) * PAGE_TOKENS, dtype=torch.int64)

    def set(self, keys: List[str], first_page: int) -> None:
        assert store_pages(self.b, self.pool, keys, self.idx(first_page, len(keys)), self.kind != "file")

    def get(self, keys: List[str], first_page: int) -> None:
        n = load_pages(self.b, self.pool, keys, self.idx(first_page, len(keys)), self.kind != "file")
        assert n == len(keys), f"{n} of {len(keys)} pages loaded"

    def sync(self) -> None:
        if self.kind == "file":
            os.sync()
        else:
            self.b.kv.sync()

    def close(self) -> None:
        if self.kind != "file":
            self.b.close()


def _exists_p99(impl: _Impl, keys: List[str], writes: int, seconds: float, tag: str) -> float:
    """p99 seconds of ``batch_exists(keys)`` (all stored) while another thread
    stores up to ``writes`` calls of 8 new pages."""
    stop = threading.Event()

    def writer() -> None:
        for n in range(writes):
            if stop.is_set():
                break
            impl.set([f"{tag}-{n:06d}-{i:03d}" + "0" * 48 for i in range(8)], 0)

    w = threading.Thread(target=writer)
    w.start()
    lat = []
    end = time.perf_counter() + seconds
    try:
        while w.is_alive() and time.perf_counter() < end:
            t0 = time.perf_counter()
            hit = impl.b.batch_exists(keys)
            lat.append(time.perf_counter() - t0)
            assert hit == len(keys), f"batch_exists found {hit} of {len(keys)} stored pages"
    finally:
        stop.set()
        w.join()
    lat.sort()
    return lat[min(len(lat) - 1, int(0.99 * len(lat)))]


def _one_page_size(args: Dict[str, Any], page_bytes: int, notes: List[str]) -> Dict[str, Any]:
    layers = max(1, page_bytes // LAYER_BYTES)
    pool = mha_pool("page_first", 2 * BATCH + 2, page=PAGE_TOKENS, layers=layers, heads=8, dim=128)
    # Random bytes in every page (touched before timing).
    buf = pool.kv_buffer.view(torch.uint8).view(-1)
    chunk = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    for off in range(0, buf.numel(), chunk.numel()):
        n = min(chunk.numel(), buf.numel() - off)
        buf[off:off + n].copy_(chunk[:n])
    pb = layers * LAYER_BYTES
    batches = max(1, args["bytes"] // (BATCH * pb))
    nbytes = batches * BATCH * pb
    gib = nbytes / 2**30
    # The exists case's writer stores up to 64 MiB of new pages (8 per call): room for them,
    # so nothing the lookups ask for is evicted.
    writes = max(4, (64 << 20) // (8 * pb))
    res: Dict[str, Dict[str, List[float]]] = {}

    def rec(impl: str, op: str, value: float, cpu: float = -1.0) -> None:
        r = res.setdefault(f"{impl}/{op}", {"values": [], "cpu": []})
        r["values"].append(value)
        if cpu >= 0:
            r["cpu"].append(cpu)

    for rep in range(args["repeat"]):
        for kind in (("dynblock", "file") if rep % 2 == 0 else ("file", "dynblock")):
            d = os.path.join(args["dir"], f"sglang-{kind}-{pb}-{rep}")
            impl = _Impl(kind, pool, d, nbytes + (8 * writes + 64) * pb)
            keys = [[f"{rep:03d}-{b:05d}-{i:03d}" + "0" * 48 for i in range(BATCH)]
                    for b in range(batches)]
            drop_caches()
            c0, t0 = cpu_seconds(), time.perf_counter()
            for ks in keys:
                impl.set(ks, 0)
            t_ret, c_ret = time.perf_counter() - t0, cpu_seconds() - c0
            impl.sync()
            t_dur, c_dur = time.perf_counter() - t0, cpu_seconds() - c0
            rec(kind, "set-return", gib / t_ret, c_ret / gib)
            rec(kind, "set-durable", gib / t_dur, c_dur / gib)
            cold = drop_caches()
            if not cold:
                notes.append("could not drop the page cache (needs root): HiCacheFile's gets "
                             "may have been served from memory")
            c0, t0 = cpu_seconds(), time.perf_counter()
            for ks in keys:
                impl.get(ks, BATCH)
            t_get, c_get = time.perf_counter() - t0, cpu_seconds() - c0
            rec(kind, "get-cold" if cold else "get", gib / t_get, c_get / gib)
            p99 = _exists_p99(impl, keys[0], writes, args["exists_seconds"], f"w{rep}")
            rec(kind, "exists-128-during-writes", p99 * 1e3)
            impl.close()
            shutil.rmtree(d, ignore_errors=True)
    return {"page_bytes": pb, "pages": batches * BATCH, "results": res}


def measure(args: Dict[str, Any]) -> Dict[str, Any]:
    logging.disable(logging.WARNING)
    notes: List[str] = []
    cases = [_one_page_size(args, pb, notes) for pb in args["page_sizes"]]
    return {"cases": cases, "notes": sorted(set(notes))}


if __name__ == "__main__":
    print("RESULT " + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
