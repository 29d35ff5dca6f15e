"""dynblock for vLLM.

``DynblockConnector`` is a vLLM KV connector (``KVConnectorBase_V1``): vLLM
saves every full KV block into dynblock's host and disk tiers and, when a new
request starts with a prefix dynblock holds, loads those blocks instead of
recomputing them, also after an engine restart (with a persistent store)::

    LLM(model=..., kv_transfer_config={
        "kv_connector": "DynblockConnector",
        "kv_connector_module_path": "dynblock.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"host_bytes": 8 << 30, "disk_bytes": 200 << 30,
                                      "disk_path": "/nvme/kv.bin", "persist": True},
    })

``kv_connector_extra_config`` holds :class:`dynblock.Config` fields (tier
sizes, ``disk_dir`` or ``disk_path`` + ``persist``, ``o_direct``, ...; the
``DYNBLOCK_*`` environment variables apply as in ``Config.from_env``) plus the
connector's own ``lookup_timeout_ms`` and ``lease_ttl_s``. The block size and
layout come from the model.

:mod:`dynblock.vllm.keys`, :mod:`~dynblock.vllm.service` and
:mod:`~dynblock.vllm.store` need no vLLM; the connector classes import vLLM
when first used.
"""

from __future__ import annotations

from typing import Any

from .keys import block_key, socket_path
from .store import LayerStore

__all__ = ["DynblockConnector", "DynblockTier", "LayerStore", "block_key", "socket_path"]


def __getattr__(name: str) -> Any:
    if name == "DynblockConnector":
        from .connector import DynblockConnector

        return DynblockConnector
    if name == "DynblockTier":
        from .tier import DynblockTier

        return DynblockTier
    raise AttributeError(f"module 'dynblock.vllm' has no attribute {name!r}")
