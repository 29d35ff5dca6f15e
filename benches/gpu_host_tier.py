"""The host tier on a GPU machine: is it registered with CUDA, and how fast do
blocks move between it and the GPU, against pageable memory and torch's own
pinned memory?

    python benches/gpu_host_tier.py [--gib N] [--repeat N]

Prints the host tier's placement (NUMA node from ``nvidia-smi topo -m``, pin,
CUDA registration) and, for host->GPU and GPU->host copies of ``--gib`` GiB
(torch ``copy_`` with ``non_blocking``, timed with CUDA events, best of
``--repeat``): GB/s from the dynblock host tier, from a plain numpy array
(pageable) and from ``torch.empty(pin_memory=True)``. Exits 0 when the tier
is registered and copies from it run at least 0.9x torch's pinned memory;
1 when not; 77 with ``SKIPPED: <reason>`` where there is no GPU or torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict


def skip(why: str) -> None:
    print(f"SKIPPED: {why}", flush=True)
    sys.exit(77)


def rate(torch: Any, dst: Any, src: Any, repeat: int) -> float:
    """Best GB/s of ``dst.copy_(src, non_blocking=True)`` over ``repeat`` runs."""
    best = 0.0
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        dst.copy_(src, non_blocking=True)
        b.record()
        torch.cuda.synchronize()
        best = max(best, src.numel() / (a.elapsed_time(b) / 1e3) / 1e9)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=int, default=4)
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    try:
        import numpy as np
        import torch
    except ImportError as e:
        skip(f"torch is not installed: {e}")
    if not torch.cuda.is_available():
        skip("no GPU: torch.cuda.is_available() is False")
    from dynblock import HostStorage
    from dynblock.cuda import gpu_available

    nbytes = a.gib << 30
    bs = 2 << 20
    out: Dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "bytes": nbytes,
                           "cuda": gpu_available()}
    with HostStorage(nbytes // bs, bs, numa_node="auto", gpu=0, pin=True, cuda_register=True) as h:
        out["host_tier"] = {"numa_node": h.numa_node, "numa_reason": h.numa_reason,
                            "pinned": h.pinned, "cuda_registered": h.cuda_registered,
                            "cuda_reason": h.cuda_reason}
        tier = torch.frombuffer(h.view(), dtype=torch.uint8)
        tier.fill_(1)
        pageable = torch.from_numpy(np.ones(nbytes, np.uint8))
        pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1)
        gpu = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        res = {}
        for name, host in (("dynblock_host_tier", tier), ("pageable", pageable), ("torch_pinned", pinned)):
            res[name] = {"h2d_GBps": round(rate(torch, gpu, host, a.repeat), 1),
                         "d2h_GBps": round(rate(torch, host, gpu, a.repeat), 1)}
        out["copies"] = res
        ok_copy = all(res["dynblock_host_tier"][k] >= 0.9 * res["torch_pinned"][k]
                      for k in ("h2d_GBps", "d2h_GBps"))
        ok = bool(h.cuda_registered) and ok_copy
        del tier
    print(json.dumps(out, indent=1))
    print(("PASS" if ok else "FAIL") + ": host tier registered=" +
          f"{out['host_tier']['cuda_registered']}, copies vs torch pinned: " +
          ", ".join(f"{k} {res['dynblock_host_tier'][k] / res['torch_pinned'][k]:.2f}x"
                    for k in ("h2d_GBps", "d2h_GBps")))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
