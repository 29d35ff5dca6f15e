"""One vLLM engine for the bench's ``vllm`` workload; run by
:mod:`dynblock.bench.vllm` with the interpreter of an environment that has
vLLM (``python -m dynblock.bench.vllm_engine '<json>'``). Prints one line
``RESULT <json>`` with each request's time to first token and cached tokens.

Arguments (JSON): ``model_dir`` and ``model`` (a Llama shape, written with
random weights when the directory is empty), ``dtype``, ``prompts`` (token
ids), ``connector`` (a ``kv_transfer_config`` or null), ``reset`` (empty
vLLM's own prefix cache before each request, so hits can only come from the
connector) and ``warmup`` (one unrelated request first)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict


def make_model(path: str, shape: Dict[str, int]) -> None:
    if os.path.exists(os.path.join(path, "config.json")):
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                      intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                      num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                      max_position_embeddings=shape["max_len"], initializer_range=0.2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)


def main() -> None:
    args: Dict[str, Any] = json.loads(sys.argv[1])
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.get("kv_gib", 2)))
    make_model(args["model_dir"], args["model"])
    from vllm import LLM, SamplingParams

    kw: Dict[str, Any] = dict(model=args["model_dir"], skip_tokenizer_init=True,
                              dtype=args.get("dtype", "float32"), enforce_eager=True,
                              max_model_len=args["model"]["max_len"], seed=0)
    if args.get("connector"):
        kw["kv_transfer_config"] = args["connector"]
    t0 = time.perf_counter()
    llm = LLM(**kw)
    start = time.perf_counter() - t0
    first = SamplingParams(max_tokens=1, temperature=0)
    if args.get("warmup"):
        n = len(args["prompts"][0])
        llm.generate([{"prompt_token_ids": [(7 * i + 3) % 997 + 1 for i in range(n)]}], first,
                     use_tqdm=False)
    out = []
    for p in args["prompts"]:
        if args.get("reset"):
            llm.reset_prefix_cache()
        t = time.perf_counter()
        r = llm.generate([{"prompt_token_ids": p}], first, use_tqdm=False)[0]
        out.append({"ttft_s": time.perf_counter() - t, "cached": r.num_cached_tokens,
                    "token": r.outputs[0].token_ids[0]})
    print("RESULT " + json.dumps({"start_s": start, "requests": out}), flush=True)


if __name__ == "__main__":
    main()
