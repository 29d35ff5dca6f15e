"""SGLang's HiCache L3 contract, run in an environment with SGLang (see
tests/test_sglang.py): ``python scenarios.py BACKEND DIR [NAME ...]`` runs the
named scenarios (all by default) against BACKEND (``dynblock``: dynblock's
``DynblockHiCache`` through the ``dynamic`` backend with the zero-copy
interface; ``dynblock-generic``: the same without ``interface_v1``, so SGLang
uses the generic page interface; ``file``: SGLang's own ``HiCacheFile``, the
reference) and prints one ``RESULT {"name": ..., "ok": ..., "detail": ...}``
line per scenario.

Backends are made by SGLang's ``StorageBackendFactory`` and given real SGLang
host pools (``MHATokenToKVPoolHost``, ``MLATokenToKVPoolHost``) over CPU
memory. Pages move the way SGLang's cache controller moves them: with
``interface_v1``, ``batch_set_v1``/``batch_get_v1`` on host indices; without
it, ``batch_set`` of ``get_data_page`` copies and ``batch_get`` into dummy
pages copied back with ``set_from_flat_data_page``."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import torch  # noqa: E402
from sglang.srt.mem_cache.storage import StorageBackendFactory  # noqa: E402

from dynblock.bench.sglang_run import (  # noqa: E402
    dynblock_extra, load_pages, mha_pool as _mha, mla_pool as _mla, storage_config, store_pages)

PAGE = 16  # tokens per page
PAGES = 128  # pages the host pool holds
LAYOUTS = ("page_first", "page_first_direct", "layer_first")


def mha_pool(layout: str) -> Any:
    return _mha(layout, PAGES, page=PAGE)


def mla_pool(layout: str) -> Any:
    return _mla(layout, PAGES, page=PAGE)


class Rig:
    """One backend on one host pool, driven the way SGLang's controller does."""

    def __init__(self, backend: str, root: str, *, layout: str = "page_first", mla: bool = False,
                 model: str = "org/model-a", tp_rank: int = 0, tp_size: int = 1,
                 persist: bool = False, extra: Optional[Dict[str, Any]] = None,
                 pool: Any = None) -> None:
        self.kind = backend
        os.makedirs(root, exist_ok=True)
        self.pool = pool if pool is not None else (mla_pool(layout) if mla else mha_pool(layout))
        if backend == "file":
            name, cfg = "file", {"file_storage_path": os.path.join(root, "hicache")}
        else:
            name = "dynamic"
            cfg = dynblock_extra(interface_v1=int(backend == "dynblock"), disk_blocks=4096,
                                 host_blocks=0)
            if persist:
                cfg.update(persist=True, disk_path=os.path.join(root, "l3.kv"))
            else:
                cfg["disk_dir"] = root
        cfg.update(extra or {})
        self.v1 = bool(cfg.get("interface_v1"))
        self.config = storage_config(cfg, model=model, mla=mla, tp_rank=tp_rank, tp_size=tp_size,
                                     layout=layout)
        self.backend = StorageBackendFactory.create_backend(name, self.config, self.pool)
        self.backend.register_mem_pool_host(self.pool)

    # Pages of the host pool: page p is tokens [p * PAGE, (p + 1) * PAGE).
    def indices(self, pages: List[int]) -> torch.Tensor:
        return torch.cat([torch.arange(p * PAGE, (p + 1) * PAGE) for p in pages]).to(torch.int64)

    def fill(self, pages: List[int], seed: int) -> List[bytes]:
        g = torch.Generator().manual_seed(seed)
        out = []
        for p in pages:
            data = self.pool.get_data_page(p * PAGE, flat=True)
            rnd = torch.randint(0, 256, (data.numel() * data.element_size(),), dtype=torch.uint8,
                                generator=g)
            self.pool.set_from_flat_data_page(p * PAGE, rnd.view(self.pool.dtype))
            out.append(self.page_bytes(p))
        return out

    def wipe(self, pages: List[int]) -> None:
        for p in pages:
            z = self.pool.get_dummy_flat_data_page()
            self.pool.set_from_flat_data_page(p * PAGE, z)

    def page_bytes(self, p: int) -> bytes:
        return self.pool.get_data_page(p * PAGE, flat=True).contiguous().view(torch.uint8).numpy().tobytes()

    def store(self, keys: List[str], pages: List[int]) -> bool:
        return store_pages(self.backend, self.pool, keys, self.indices(pages), self.v1)

    def load(self, keys: List[str], pages: List[int]) -> int:
        """How many leading pages arrived (the controller's count)."""
        return load_pages(self.backend, self.pool, keys, self.indices(pages), self.v1)

    def exists(self, keys: List[str]) -> int:
        return int(self.backend.batch_exists(keys))

    def close(self) -> None:
        # HiCacheFile has no close() (SGLang's fault injector would call it anyway).
        if self.kind != "file":
            self.backend.close()


def keys_for(prefix: str, n: int) -> List[str]:
    return [f"{prefix}-{i:04d}" + "0" * 40 for i in range(n)]


# --- scenarios: each returns a detail string or raises ------------------------------
def roundtrip(backend: str, root: str, layout: str, mla: bool) -> str:
    r = Rig(backend, os.path.join(root, f"rt-{layout}-{mla}"), layout=layout, mla=mla)
    src = [3, 17, 5, 40, 22, 9, 31, 0]
    dst = [50, 11, 63, 2, 45, 28, 36, 19]
    want = r.fill(src, seed=1)
    keys = keys_for(f"rt{layout}{mla}", len(src))
    assert r.store(keys, src), "store reported a failure"
    assert r.exists(keys) == len(keys), f"exists {r.exists(keys)} of {len(keys)}"
    r.wipe(dst)
    n = r.load(keys, dst)
    assert n == len(keys), f"{n} of {len(keys)} pages loaded"
    for i, p in enumerate(dst):
        assert r.page_bytes(p) == want[i], f"page {i} (host page {p}) differs after the round trip"
    r.close()
    return f"{len(keys)} pages byte-exact"


def partial(backend: str, root: str) -> str:
    r = Rig(backend, os.path.join(root, "partial"))
    pages = list(range(10))
    want = r.fill(pages, seed=2)
    keys = keys_for("partial", 15)
    assert r.store(keys[:10], pages)
    assert r.exists(keys) == 10, f"exists says {r.exists(keys)}, expected 10"
    assert r.exists(keys[10:]) == 0
    assert r.exists([keys[10]] + keys[:10]) == 0, "a missing first page is not a hit"
    dst = list(range(20, 35))
    r.wipe(dst)
    n = r.load(keys, dst)
    assert n == 10, f"loaded {n}, expected the 10 stored pages"
    assert all(r.page_bytes(dst[i]) == want[i] for i in range(10))
    r.close()
    return "10 of 15 pages hit and load"


def exists_while_writing(backend: str, root: str) -> str:
    r = Rig(backend, os.path.join(root, "concurrent"))
    pages = list(range(32))
    r.fill(pages, seed=3)
    keys = keys_for("conc", 128)
    done = threading.Event()
    errors: List[str] = []

    def writer() -> None:
        try:
            for b in range(0, 128, 8):
                assert r.store(keys[b:b + 8], pages[(b % 32):(b % 32) + 8])
        except BaseException as e:  # noqa: BLE001
            errors.append(repr(e))
        finally:
            done.set()

    t = threading.Thread(target=writer)
    t.start()
    seen, calls = 0, 0
    while not done.is_set() or calls == 0:
        n = r.exists(keys)
        calls += 1
        assert 0 <= n <= 128 and n >= seen, f"exists went from {seen} to {n}"
        seen = n
    t.join()
    assert not errors, errors
    assert r.exists(keys) == 128
    r.close()
    return f"{calls} exists calls during 16 writes, never decreasing"


def restart_write(backend: str, root: str) -> str:
    r = Rig(backend, os.path.join(root, "restart"), persist=True)
    want = r.fill(list(range(12)), seed=4)
    assert r.store(keys_for("restart", 12), list(range(12)))
    r.close()
    with open(os.path.join(root, "restart-want.json"), "w") as f:
        json.dump([w.hex() for w in want], f)
    return "12 pages stored and closed"


def expect_pages(r: Rig, wanted: str, keys: List[str], first_dst: int, where: str) -> None:
    """All of ``keys`` hit, and load into host pages from ``first_dst`` with the
    bytes listed in the file ``wanted`` (hex, one per page)."""
    with open(wanted) as f:
        want = [bytes.fromhex(w) for w in json.load(f)]
    n = len(keys)
    assert r.exists(keys) == n, f"{where}: exists says {r.exists(keys)} of {n}"
    dst = list(range(first_dst, first_dst + n))
    assert r.load(keys, dst) == n
    assert all(r.page_bytes(dst[i]) == want[i] for i in range(n)), f"{where}: bytes differ"
    r.close()


def restart_read(backend: str, root: str) -> str:
    r = Rig(backend, os.path.join(root, "restart"), persist=True)
    expect_pages(r, os.path.join(root, "restart-want.json"), keys_for("restart", 12), 30,
                 "after a restart")
    return "12 pages hit and byte-exact in a new process"


def identity(backend: str, root: str) -> str:
    d = os.path.join(root, "identity")
    a = Rig(backend, d, persist=True, tp_rank=0, tp_size=2)
    a.fill(list(range(4)), seed=5)
    keys = keys_for("ident", 4)
    assert a.store(keys, list(range(4)))
    assert a.exists(keys) == 4
    a.close()
    other_model = Rig(backend, d, persist=True, tp_rank=0, tp_size=2, model="org/model-b")
    assert other_model.exists(keys) == 0, "another model hits this model's pages"
    other_model.close()
    other_rank = Rig(backend, d, persist=True, tp_rank=1, tp_size=2)
    assert other_rank.exists(keys) == 0, "TP rank 1 hits TP rank 0's pages"
    other_rank.close()
    same = Rig(backend, d, persist=True, tp_rank=0, tp_size=2)
    assert same.exists(keys) == 4, "the same model and rank misses its own pages"
    same.close()
    return "another model and another TP rank miss; the same rank hits"


def mla_ranks(backend: str, root: str) -> str:
    """MLA at TP 2: only rank 0 (the writer) stores; rank 1, a process with its own host
    pool, hits and loads the writer's pages, and never loads a page the writer has since
    dropped or replaced."""
    d = os.path.join(root, "mla-ranks")
    w = Rig(backend, d, mla=True, persist=True, tp_rank=0, tp_size=2)
    r = Rig(backend, d, mla=True, persist=True, tp_rank=1, tp_size=2)
    assert w.config.is_storage_writer and not r.config.is_storage_writer
    pages = list(range(8))
    want = w.fill(pages, seed=9)
    keys = keys_for("mla", 8)
    assert r.exists(keys) == 0, "the reader hits before the writer stored"
    assert w.store(keys, pages)
    assert r.exists(keys) == 8, f"the reader rank sees {r.exists(keys)} of the writer's 8 pages"
    dst = list(range(40, 48))
    r.wipe(dst)
    assert r.load(keys, dst) == 8
    assert all(r.page_bytes(dst[i]) == want[i] for i in range(8)), "the reader loaded other bytes"
    # The writer drops everything and stores other pages (reusing its space); the reader still
    # believes the old pages are there until it looks again: a load must not give other bytes.
    w.backend.clear()
    w.fill(pages, seed=10)
    assert w.store(keys_for("mla-new", 8), pages)
    r.wipe(dst)
    n = r.load(keys, dst)
    assert all(r.page_bytes(dst[i]) == want[i] for i in range(n)), "a stale page loaded wrong bytes"
    assert n == 0, f"{n} pages the writer dropped still loaded"
    assert r.exists(keys_for("mla-new", 8)) == 8, "the reader misses the writer's new pages"
    assert r.exists(keys) == 0, "the reader still sees pages the writer dropped"
    w.close()
    r.close()
    return "the reader rank hits the writer's pages, byte-exact; dropped pages miss"


def mla_writer_holding(backend: str, root: str) -> str:
    """The writer rank of an MLA model at TP 2: stores 8 pages, says so
    (``mla-want.json``), and keeps its store open until ``mla-done`` appears."""
    w = Rig(backend, os.path.join(root, "mla-xproc"), mla=True, persist=True, tp_rank=0, tp_size=2)
    want = w.fill(list(range(8)), seed=11)
    assert w.store(keys_for("xproc", 8), list(range(8)))
    tmp = os.path.join(root, "mla-want.json.tmp")
    with open(tmp, "w") as f:
        json.dump([x.hex() for x in want], f)
    os.replace(tmp, os.path.join(root, "mla-want.json"))
    end = time.monotonic() + 300
    while not os.path.exists(os.path.join(root, "mla-done")) and time.monotonic() < end:
        time.sleep(0.05)
    w.close()
    return "stored 8 pages and held the store open"


def mla_reader_process(backend: str, root: str) -> str:
    """Rank 1 of that model, in another process, while the writer holds its store."""
    r = Rig(backend, os.path.join(root, "mla-xproc"), mla=True, persist=True, tp_rank=1, tp_size=2)
    expect_pages(r, os.path.join(root, "mla-want.json"), keys_for("xproc", 8), 50,
                 "the reader process")
    return "8 pages of the writer process hit and load byte-exact"


def stats_clear(backend: str, root: str) -> str:
    r = Rig(backend, os.path.join(root, "stats"))
    r.fill(list(range(6)), seed=6)
    keys = keys_for("stats", 6)
    assert r.store(keys, list(range(6)))
    assert r.load(keys, list(range(10, 16))) == 6
    m = r.backend.get_stats()
    detail = "no stats"
    if r.kind != "file":
        assert m is not None and type(m).__name__ == "StorageMetrics", f"get_stats gave {m!r}"
        assert m.backup_pgs == [6] and m.prefetch_pgs == [6], (m.backup_pgs, m.prefetch_pgs)
        assert all(b > 0 for b in m.backup_bandwidth + m.prefetch_bandwidth)
        again = r.backend.get_stats()
        assert again.backup_pgs == [] and again.prefetch_pgs == [], "stats are not drained"
        detail = "StorageMetrics with 6 pages each way, drained"
    r.backend.clear()
    assert r.exists(keys) == 0, "clear() left pages"
    r.close()
    return detail + "; clear() drops every page"


def corrupt(backend: str, root: str) -> str:
    """A page whose stored bytes changed is a miss in the load, never wrong bytes."""
    d = os.path.join(root, "corrupt")
    r = Rig(backend, d, persist=True)
    want = r.fill(list(range(4)), seed=7)
    keys = keys_for("corrupt", 4)
    assert r.store(keys, list(range(4)))
    r.close()
    path = os.path.join(d, "l3.kv.tp0of1")
    data = bytearray(open(path, "rb").read())
    needle = want[2][:64]
    at = data.find(needle)
    assert at >= 0, "page 2's bytes are not in the data file"
    data[at + 10] ^= 0xFF
    with open(path, "r+b") as f:
        f.seek(at + 10)
        f.write(bytes([data[at + 10]]))
    r = Rig(backend, d, persist=True)
    assert r.exists(keys) == 4
    dst = [20, 21, 22, 23]
    r.wipe(dst)
    res = r.backend.batch_get_v1(keys, r.indices(dst)) if r.v1 else None
    if res is None:
        n = r.load(keys, dst)
        res = [i < n for i in range(4)]
    assert res[2] is False, f"the corrupted page loaded: {res}"
    assert res[0] and res[1], res
    assert r.page_bytes(dst[0]) == want[0] and r.page_bytes(dst[1]) == want[1]
    failed = r.backend.stats()["failed_pages"] if hasattr(r.backend, "stats") else None
    r.close()
    return f"corrupted page is a miss ({res}), failed_pages={failed}"


def refusals(backend: str, root: str) -> str:
    msgs = []
    for extra, word in (({"no_such_key": 1}, "no_such_key"), ({"block_size": 4096}, "block_size")):
        try:
            Rig(backend, os.path.join(root, "refuse"), extra=extra)
        except ValueError as e:
            assert word in str(e), str(e)
            msgs.append(str(e))
        else:
            raise AssertionError(f"extra config {extra} was accepted")
    # A host layout whose pages are not in one buffer of equal pieces is refused by name.
    try:
        Rig(backend, os.path.join(root, "refuse"), pool=mha_pool("page_head"), layout="page_head")
    except ValueError as e:
        assert "page_head" in str(e), str(e)
        msgs.append(str(e))
    else:
        raise AssertionError("the page_head layout was accepted")
    # A persistent store made for pages of another geometry (here: twice the layers) is refused.
    Rig(backend, os.path.join(root, "geometry"), persist=True).close()
    try:
        Rig(backend, os.path.join(root, "geometry"), persist=True, pool=_mha("page_first", PAGES, layers=4))
    except ValueError as e:
        assert "store refuses them" in str(e) and "block_size" in str(e), str(e)
        msgs.append(str(e))
    else:
        raise AssertionError("a store of another page geometry was opened")
    try:
        Rig(backend, os.path.join(root, "refuse"), mla=True, tp_rank=1, tp_size=2)
    except ValueError as e:
        assert "MLA" in str(e) and "disk_path" in str(e), str(e)
        msgs.append(str(e))
    else:
        raise AssertionError("an MLA reader rank was accepted")
    return " | ".join(msgs)


def injected_failures(backend: str, root: str) -> str:
    """SGLang's own fault injector around the backend (SGLANG_TEST_HICACHE_BACKEND_*):
    whatever it fails, a page reported loaded holds exactly its bytes."""
    r = Rig(backend, os.path.join(root, "inject"))
    assert type(r.backend).__name__ == "HiCacheStorageFailureInjector", type(r.backend).__name__
    pages = list(range(16))
    want = r.fill(pages, seed=8)
    keys = keys_for("inject", 16)
    stored = loaded = 0
    for rnd in range(20):
        if r.store(keys, pages):
            stored += 1
        dst = list(range(32, 48))
        r.wipe(dst)
        n = r.load(keys, dst)
        loaded += n
        for i in range(n):
            assert r.page_bytes(dst[i]) == want[i], f"round {rnd}: page {i} loaded wrong bytes"
    r.close()
    assert stored and loaded, f"nothing got through the injector ({stored} stores, {loaded} pages)"
    return f"{stored}/20 stores succeeded, {loaded} pages loaded, all byte-exact"


SCENARIOS: Dict[str, Callable[[str, str], str]] = {
    **{f"roundtrip-{'mla' if mla else 'mha'}-{lay}":
       (lambda b, d, lay=lay, mla=mla: roundtrip(b, d, lay, mla))
       for lay in LAYOUTS for mla in (False, True)},
    "partial": partial,
    "exists-while-writing": exists_while_writing,
    "restart-write": restart_write,
    "restart-read": restart_read,
    "identity": identity,
    "stats-clear": stats_clear,
    "mla-ranks": mla_ranks,
    "mla-writer-holding": mla_writer_holding,
    "mla-reader-process": mla_reader_process,
    "corrupt": corrupt,
    "refusals": refusals,
    "injected-failures": injected_failures,
}


def main(argv: List[str]) -> int:
    backend, root, names = argv[0], argv[1], argv[2:] or list(SCENARIOS)
    os.makedirs(root, exist_ok=True)
    for name in names:
        try:
            res: Tuple[bool, str] = (True, SCENARIOS[name](backend, root))
        except BaseException:  # noqa: BLE001 - reported, not swallowed
            res = (False, traceback.format_exc()[-3000:])
        print("RESULT " + json.dumps({"name": name, "ok": res[0], "detail": res[1]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
