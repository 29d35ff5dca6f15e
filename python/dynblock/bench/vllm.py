"""The bench's ``vllm`` workload (not in the default run): time to first
token of a request whose prefix dynblock's disk tier holds, against the same
request recomputed, in real vLLM engines (the CPU build) on random-weight
Llamas. Each engine runs in its own process with an interpreter that has vLLM
and dynblock (``--vllm-python``, ``DYNBLOCK_VLLM_PYTHON``, ``.venv-vllm`` as
``.ci/vllm-env`` builds it, or this interpreter)."""

from __future__ import annotations

import os
import random
from typing import Any, Dict, List, Optional, Tuple

from .common import Progress, Results, find_python, run_module

BLOCK_TOKENS = 128  # vLLM's CPU backend
MODELS: Dict[str, Dict[str, int]] = {
    # 2 layers, 2 KV heads of 64: one (block, layer) is 128 KiB of float32
    "tiny": dict(layers=2, hidden=256, heads=4, kv_heads=2, intermediate=512, vocab=1000,
                 max_len=1024, prefix_blocks=3),
    # 8 layers, 8 KV heads of 64, 2048-token prefix: 128 blocks of 512 KiB from disk
    "large": dict(layers=8, hidden=1024, heads=16, kv_heads=8, intermediate=2816, vocab=1000,
                  max_len=4096, prefix_blocks=16),
}


def find_vllm_python(explicit: Optional[str] = None) -> Tuple[Optional[str], str]:
    """An interpreter that imports vllm and dynblock, or (None, why not)."""
    return find_python(explicit, "DYNBLOCK_VLLM_PYTHON", "vllm, dynblock.vllm.connector",
                       "build one with `bash .ci/vllm-env` or pass --vllm-python")


def _engine(python: str, args: Dict[str, Any]) -> Dict[str, Any]:
    return dict(run_module(python, "dynblock.bench.vllm_engine", args, "vLLM engine", 1800))


def run_vllm(res: Results, directory: str, python: Optional[str], models: List[str], repeat: int,
             progress: Progress) -> None:
    python, why = find_vllm_python(python)
    if python is None:
        res.note(f"vllm workload skipped: {why}")
        return
    for name in models:
        shape = MODELS[name]
        rng = random.Random(0)
        prefix = [rng.randrange(1, shape["vocab"]) for _ in range(shape["prefix_blocks"] * BLOCK_TOKENS)]
        prompts = [prefix + [rng.randrange(1, shape["vocab"]) for _ in range(16)] for _ in range(repeat)]
        model_dir = os.path.join(directory, f"vllm-{name}")
        store = os.path.join(directory, f"vllm-{name}.kv")
        per_layer = shape["prefix_blocks"] * shape["layers"]
        conn = {"kv_connector": "DynblockConnector", "kv_connector_module_path": "dynblock.vllm",
                "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                "kv_connector_extra_config": {"host_blocks": 0, "disk_blocks": 2 * per_layer + 64,
                                              "disk_path": store, "persist": True}}
        base = {"model_dir": model_dir, "model": shape}
        progress.add(3)
        progress.step(f"vllm {name}: storing the prefix")
        _engine(python, dict(base, prompts=[prefix + [1]], connector=conn))
        progress.step(f"vllm {name}: restarted engine, prefix from disk")
        loaded = _engine(python, dict(base, prompts=prompts, connector=conn, reset=True, warmup=True))
        progress.step(f"vllm {name}: recomputing")
        recomputed = _engine(python, dict(base, prompts=prompts, connector=None, reset=True,
                                          warmup=True))
        params = {"model": name, "layers": shape["layers"], "prefix_tokens": len(prefix)}
        a = res.case("vllm", "dynblock-disk", "ttft", unit="s", **params)
        b = res.case("vllm", "recompute", "ttft", unit="s", **params)
        a.values = [r["ttft_s"] for r in loaded["requests"]]
        b.values = [r["ttft_s"] for r in recomputed["requests"]]
        a.ratios["speedup_vs_recompute"] = b.median / a.median
        hit_blocks = [r["cached"] // BLOCK_TOKENS for r in loaded["requests"]]
        a.extra = {"hit_blocks": hit_blocks, "dynblock_blocks_read": [h * shape["layers"] for h in hit_blocks],
                   "same_first_token": [x["token"] for x in loaded["requests"]]
                   == [x["token"] for x in recomputed["requests"]],
                   "engine_start_s": round(loaded["start_s"], 1)}
        b.extra = {"cached_tokens": [r["cached"] for r in recomputed["requests"]]}
