"""The bench's ``vllmtier`` workload (not in the default run): dynblock as a
secondary tier of vLLM's offloading (:class:`dynblock.vllm.DynblockTier`, a
disk-only store) against vLLM's own ``fs`` tier, both made by vLLM's
``SecondaryTierFactory`` over the same primary tier and filesystem, driven
through vLLM's tier interface in one run (see
:mod:`dynblock.bench.vllm_tier_run`):

- ``store``: every chunk stored from the primary tier, in jobs of 16 chunks,
  until every job has reported;
- ``load-cold``: every chunk loaded into other primary chunks after the page
  cache is dropped (when it cannot be, not root, the loads may be warm; both
  tiers use O_DIRECT where the filesystem takes it).

``dynblock-tier`` is the tier as configured by default (checksums on: every
chunk's CRC32C computed when stored and checked when loaded, which vLLM's
``fs`` tier does not do); ``dynblock-tier-no-checksums`` shows what they cost;
``dynblock-tier-zero-filled`` is the default with ``preallocate="zero"``: its
file is written once when the tier is made, so that its first stores are not
also converting ``fallocate``'s unwritten space (ext4, XFS). ``open`` is the
seconds each tier took to be made (before its stores, which never include it).

CPU seconds per GiB are the measuring process's (every thread). vLLM runs in
its own interpreter (``--vllm-python``, ``DYNBLOCK_VLLM_PYTHON``, or
``.venv-vllm`` as ``.ci/vllm-env`` builds it)."""

from __future__ import annotations

from typing import List, Optional

from .common import Progress, Results, run_engine_workload
from .vllm import find_vllm_python

OPS = ("store", "load-cold")


def run_vllm_tier(res: Results, directory: str, python: Optional[str], chunk_sizes: List[int],
                  nbytes: int, repeat: int, progress: Progress) -> None:
    python, why = find_vllm_python(python)
    args = {"dir": directory, "chunk_sizes": chunk_sizes, "bytes": nbytes, "repeat": repeat,
            "job_chunks": 16}
    out = run_engine_workload(res, progress, python, why, "vllmtier", "dynblock.bench.vllm_tier_run",
                              args)
    if out is None:
        return
    for case in out["cases"]:
        cb = int(case["chunk_bytes"])
        for name, vals in case["results"].items():
            impl, op = name.split("/", 1)
            name = {"dynblock": "dynblock-tier", "fs": "vllm-fs-tier"}.get(impl, "dynblock-tier-" + impl[9:])
            c = res.case("vllmtier", name, op, unit="s" if op == "open" else "GiB/s", block_size=cb)
            c.values = list(vals["values"])
            c.cpu = list(vals["cpu"])
        for op in OPS:
            f = res.find("vllmtier", "vllm-fs-tier", op, block_size=cb)
            for impl in ("dynblock-tier", "dynblock-tier-no-checksums", "dynblock-tier-zero-filled"):
                d = res.find("vllmtier", impl, op, block_size=cb)
                if d is None or f is None or not d.values or not f.values:
                    continue
                d.ratios["vs_vllm_fs_tier"] = d.median / f.median
                if d.cpu and f.cpu and f.cpu_s_per_gib:
                    d.ratios["cpu_vs_vllm_fs_tier"] = (d.cpu_s_per_gib or 0.0) / f.cpu_s_per_gib


__all__ = ["run_vllm_tier"]
