"""Runs one vLLM engine (CPU build) on a tiny random-weight Llama and prints
one JSON line of results. Run by tests/test_vllm.py with the interpreter of
the separate vLLM environment (.ci/vllm-env), never imported by pytest.

    python driver.py '{"model_dir": ..., "dtype": "float32", "connector": {...} | null,
                       "prompts": [[token ids], ...], "max_tokens": 8,
                       "salts": [cache_salt or null per prompt] (optional)}'   (or @args.json)

The prompts run one after another (one ``generate`` each), so vLLM's own
cache sees them in order. ``RecordingConnector`` is DynblockConnector plus a
file the worker rewrites after every step with the connector's counters and
the store's stats, so the test can see what the worker process did;
``BareConnector`` loads and saves nothing (a baseline on the connector path).
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")

try:
    from dynblock.vllm.connector import DynblockConnector
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                                   KVConnectorMetadata)
except ImportError:  # imported outside the vLLM environment: nothing to define
    DynblockConnector = KVConnectorBase_V1 = KVConnectorMetadata = object  # type: ignore


class BareConnector(KVConnectorBase_V1):  # type: ignore[misc,valid-type]
    """A connector that loads and saves nothing: the engine's connector code
    path without a store. With any KV connector configured, vLLM's CPU build
    computes bfloat16 differently on this project's CI machines (AMX): a prompt
    no cache ever touches gets other greedy tokens than without a connector
    (seen with this class as with DynblockConnector), so an exact bfloat16
    comparison needs a baseline on the same path."""

    def get_num_new_matched_tokens(self, request, num_computed_tokens):  # type: ignore[no-untyped-def]
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens):  # type: ignore[no-untyped-def]
        pass

    def build_connector_meta(self, scheduler_output):  # type: ignore[no-untyped-def]
        return KVConnectorMetadata()

    def start_load_kv(self, forward_context, **kwargs):  # type: ignore[no-untyped-def]
        pass

    def wait_for_layer_load(self, layer_name):  # type: ignore[no-untyped-def]
        pass

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):  # type: ignore[no-untyped-def]
        pass

    def wait_for_save(self):  # type: ignore[no-untyped-def]
        pass


class RecordingConnector(DynblockConnector):  # type: ignore[misc,valid-type]
    def get_block_ids_with_load_errors(self):  # type: ignore[no-untyped-def]
        errors = super().get_block_ids_with_load_errors()
        self._reported = getattr(self, "_reported", 0) + len(errors)
        path = os.environ.get("DYNBLOCK_TEST_RECORD")
        if path and self._store is not None:
            rec = dict(self.counters)
            rec["store"] = {k: v for k, v in self._store.kv.stats().items()
                            if isinstance(v, (int, float))}
            rec["lookups"] = self._store.lookups
            rec["hit_blocks"] = self._store.hit_blocks
            rec["held_leases"] = len(self._store._held)  # lookups leased, not yet loaded
            rec["warmed_blocks"] = self._store.warmed_blocks
            rec["reported_errors"] = self._reported
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(rec, f)
            os.replace(tmp, path)
        return errors


def _args(arg: str) -> dict:
    """The run's arguments: JSON, or ``@path`` of a JSON file (long prompt lists)."""
    if arg.startswith("@"):
        with open(arg[1:]) as f:
            return json.load(f)
    return json.loads(arg)


def make_model(path: str) -> None:
    """A 2-layer Llama with random weights (seeded): 4 heads of 64, 2 KV heads."""
    if os.path.exists(os.path.join(path, "config.json")):
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=4096, initializer_range=0.2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)


def main() -> None:
    args = _args(sys.argv[1])
    make_model(args["model_dir"])
    from vllm import LLM, SamplingParams

    kw = dict(model=args["model_dir"], skip_tokenizer_init=True, dtype=args.get("dtype", "float32"),
              enforce_eager=True, max_model_len=args.get("max_model_len", 1024), seed=0)
    if args.get("num_blocks"):
        kw["num_gpu_blocks_override"] = args["num_blocks"]
    if args.get("connector"):
        kw["kv_transfer_config"] = args["connector"]
    t0 = time.time()
    llm = LLM(**kw)
    start = time.time() - t0
    if args.get("fill_after_start"):
        # Another tenant fills the store's filesystem once the engine is up.
        with open(args["fill_after_start"], "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 16))
                    f.flush()
            except OSError:
                pass
    sp = SamplingParams(max_tokens=args.get("max_tokens", 8), temperature=0)
    results = []
    salts = args.get("salts") or [None] * len(args["prompts"])
    for p, salt in zip(args["prompts"], salts):
        t = time.time()
        prompt = {"prompt_token_ids": p}
        if salt is not None:
            prompt["cache_salt"] = salt  # the request's tenant
        out = llm.generate([prompt], sp, use_tqdm=False)[0]
        results.append({"tokens": list(out.outputs[0].token_ids),
                        "cached": out.num_cached_tokens, "seconds": time.time() - t})
    print("RESULT " + json.dumps({"start_s": start, "results": results}), flush=True)
    del llm


if __name__ == "__main__":
    main()
