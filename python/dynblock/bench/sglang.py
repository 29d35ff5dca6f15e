"""The bench's ``sglang`` workload (not in the default run): SGLang's HiCache
L3 on dynblock (:mod:`dynblock.sglang`, zero-copy v1 interface, a persistent
disk-only store) against SGLang's own ``HiCacheFile`` (one file per page,
through the controller's generic path), on SGLang's own CPU host pool
(``page_first``, MHA), the same pages and filesystem, in one run:

- ``set-return``: 128-page batches stored, until the calls return;
- ``set-durable``: the same plus what makes them durable (dynblock's
  ``sync()``; ``os.sync()`` for HiCacheFile);
- ``get-cold``: the pages loaded into other host-pool pages after the page
  cache is dropped (``get`` when it cannot be: not root);
- ``exists-128-during-writes``: p99 of ``batch_exists`` of 128 stored keys
  while another thread stores pages.

CPU seconds per GiB are the measuring process's (every thread); for
HiCacheFile the kernel's writeback threads are not in them.

SGLang runs in its own interpreter (``--sglang-python``,
``DYNBLOCK_SGLANG_PYTHON``, ``.venv-vllm`` as ``.ci/vllm-env`` +
``.ci/sglang-env`` build it, or this one)."""

from __future__ import annotations

from typing import List, Optional, Tuple

from .common import Progress, Results, find_python, run_engine_workload

OPS = ("set-return", "set-durable", "get-cold", "get", "exists-128-during-writes")


def find_sglang_python(explicit: Optional[str] = None) -> Tuple[Optional[str], str]:
    """An interpreter that imports SGLang's HiCache storage and dynblock, or (None, why not)."""
    return find_python(explicit, "DYNBLOCK_SGLANG_PYTHON", "dynblock.sglang",
                       "build one with `bash .ci/vllm-env && bash .ci/sglang-env` or pass "
                       "--sglang-python")


def run_sglang(res: Results, directory: str, python: Optional[str], page_sizes: List[int],
               nbytes: int, repeat: int, progress: Progress) -> None:
    python, why = find_sglang_python(python)
    args = {"dir": directory, "page_sizes": page_sizes, "bytes": nbytes, "repeat": repeat,
            "exists_seconds": 1.0}
    out = run_engine_workload(res, progress, python, why, "sglang", "dynblock.bench.sglang_run", args)
    if out is None:
        return
    for case in out["cases"]:
        pb = int(case["page_bytes"])
        for name, vals in case["results"].items():
            impl, op = name.split("/", 1)
            unit = "ms p99" if op.startswith("exists") else "GiB/s"
            c = res.case("sglang", "dynblock" if impl == "dynblock" else "hicache-file", op,
                         unit=unit, block_size=pb)
            c.values = list(vals["values"])
            c.cpu = list(vals["cpu"])
        for op in OPS:
            d = res.find("sglang", "dynblock", op, block_size=pb)
            f = res.find("sglang", "hicache-file", op, block_size=pb)
            if d is None or f is None or not d.values or not f.values:
                continue
            if op.startswith("exists"):
                d.ratios["goal_0.2ms_over_p99"] = 0.2 / d.median if d.median > 0 else float("inf")
                continue
            d.ratios["vs_hicache_file"] = d.median / f.median
            if d.cpu and f.cpu and f.cpu_s_per_gib:
                d.ratios["cpu_vs_hicache_file"] = (d.cpu_s_per_gib or 0.0) / f.cpu_s_per_gib


__all__ = ["run_sglang", "find_sglang_python"]
