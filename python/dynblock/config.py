"""Configuration of a :class:`~dynblock.BlockManager`.

``Config(...)`` takes sizes in blocks or bytes and resolves them at
construction; ``repr(config)`` shows the resolved values. ``Config.from_env()``
reads ``DYNBLOCK_*`` variables and Dynamo's ``DYN_KVBM_*`` names so a
deployment can switch without rewriting its environment.

Environment mapping (``DYNBLOCK_*`` wins over Dynamo's name when both are set;
keyword arguments to ``from_env`` win over both):

========================================  =====================================
variable                                  meaning
========================================  =====================================
``DYNBLOCK_BLOCK_SIZE``                   ``block_size`` in bytes
``DYNBLOCK_HOST_BLOCKS``                  ``host_blocks``
``DYNBLOCK_HOST_BYTES``                   ``host_bytes``
``DYN_KVBM_CPU_CACHE_GB``                 ``host_bytes = GB * 10**9`` (decimal
                                          GB, as Dynamo reads it)
``DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS``  ``host_blocks`` (wins over the GB)
``DYNBLOCK_DISK_BLOCKS``                  ``disk_blocks``
``DYNBLOCK_DISK_BYTES``                   ``disk_bytes``
``DYN_KVBM_DISK_CACHE_GB``                ``disk_bytes = GB * 10**9``
``DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS``  ``disk_blocks`` (wins over the GB)
``DYNBLOCK_DISK_DIR``,                    ``disk_dir``
``DYN_KVBM_DISK_CACHE_DIR``
``DYNBLOCK_DISABLE_O_DIRECT``,            ``o_direct = not value``
``DYN_KVBM_DISK_DISABLE_O_DIRECT``
``DYN_KVBM_DISK_ZEROFILL_FALLBACK``       true: ``preallocate="auto"`` (zero-fill
                                          where fallocate is unsupported);
                                          false: ``"sparse-fallback"``
``DYNBLOCK_DISABLE_NUMA``,                ``numa_node = None``
``DYN_MEMORY_DISABLE_NUMA``
``DYNBLOCK_NUMA_NODE``                    ``numa_node`` (an integer or ``auto``)
``DYNBLOCK_GPU``                          ``gpu`` (CUDA ordinal)
``DYNBLOCK_PIN``                          ``pin`` (boolean)
``DYNBLOCK_IO_DEPTH``                     ``io_depth``
``DYNBLOCK_DISK_PATH``                    ``disk_path`` (a persistent store's file)
``DYNBLOCK_PERSIST``                      ``persist`` (boolean)
``DYNBLOCK_DURABILITY``                   ``durability``: ``process`` or ``sync``
``DYNBLOCK_WRITE_THROUGH``                ``write_through`` (boolean)
``DYNBLOCK_CHECKSUMS``                    ``checksums`` (boolean)
========================================  =====================================

Booleans accept exactly ``1/true/yes/on`` and ``0/false/no/off``; any other
value raises :class:`~dynblock.EnvError` naming the variable and the
accepted form.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Dict, Literal, Mapping, Optional, Union

from ._env import EnvError, env_bool, env_float, env_int, env_str, numa_disabled, o_direct_disabled

__all__ = ["Config", "KvLayout"]

_DTYPE_BYTES = {
    "float32": 4, "fp32": 4, "float": 4,
    "float16": 2, "fp16": 2, "half": 2,
    "bfloat16": 2, "bf16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1,
    "int8": 1, "uint8": 1,
}


def _itemsize(dtype: Any) -> int:
    name = str(dtype).replace("torch.", "").lower()
    if name in _DTYPE_BYTES:
        return _DTYPE_BYTES[name]
    try:
        import numpy as np

        return int(np.dtype(dtype).itemsize)
    except TypeError:
        raise ValueError(
            f"layout dtype {dtype!r} is not known; use e.g. 'bfloat16', 'float16', 'float8_e4m3fn'"
        ) from None


def _count(name: str, v: Any, *, allow_zero: bool = True) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    if v < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '>= 1'}, got {v}")
    return v


@dataclass(frozen=True)
class KvLayout:
    """Shape of one KV block: ``num_layers x outer_dim x page_size x inner_dim``
    elements of ``dtype``. ``outer_dim`` is 2 for separate K and V, 1 for MLA;
    ``page_size`` is tokens per block; ``inner_dim`` is ``kv_heads x head_dim``."""

    num_layers: int
    outer_dim: int
    page_size: int
    inner_dim: int
    dtype: Any = "bfloat16"

    def __post_init__(self) -> None:
        for f in ("num_layers", "outer_dim", "page_size", "inner_dim"):
            _count(f"layout.{f}", getattr(self, f), allow_zero=False)
        if self.outer_dim not in (1, 2):
            raise ValueError(f"layout.outer_dim must be 2 (K and V) or 1 (MLA), got {self.outer_dim}")
        _itemsize(self.dtype)

    @property
    def block_size(self) -> int:
        return self.num_layers * self.outer_dim * self.page_size * self.inner_dim * _itemsize(self.dtype)


@dataclass
class Config:
    """Everything a :class:`~dynblock.BlockManager` needs.

    Give ``block_size`` (bytes) or ``layout``; tier sizes in blocks
    (``host_blocks``, ``disk_blocks``) or bytes (``host_bytes``,
    ``disk_bytes``, rounded down to whole blocks). A size of 0 disables that
    tier. ``disk_dir`` defaults to the system temporary directory (check it
    with ``python -m dynblock.doctor``: in containers it is often overlayfs or
    tmpfs).

    Durability: by default the disk tier is an anonymous file that vanishes
    with the process. ``persist=True`` with ``disk_path`` keeps a named data
    file plus an index (``disk_path + ".index"``) that survive restarts and
    ``kill -9``: every block whose disk write completed is recovered.
    ``durability="process"`` (default) survives the death of the process;
    ``"sync"`` also fdatasyncs data then index at every batch, surviving power
    loss (or call ``sync()`` at the points you choose). ``write_through=True``
    makes ``put`` write to disk too, so blocks in the host tier also survive.
    ``checksums`` (default on) verifies a CRC32C of every block read from disk:
    a mismatch is a miss, never wrong bytes.
    """

    block_size: Optional[int] = None
    layout: Optional[KvLayout] = None
    host_blocks: Optional[int] = None
    disk_blocks: Optional[int] = None
    host_bytes: Optional[int] = None
    disk_bytes: Optional[int] = None
    disk_dir: Optional[str] = None
    o_direct: Union[bool, Literal["require"]] = True
    preallocate: Literal["auto", "zero", "sparse-fallback", "sparse"] = "auto"
    numa_node: Union[int, None, Literal["auto"]] = "auto"
    gpu: Optional[int] = None
    pin: Union[bool, Literal["require"]] = True
    io_depth: int = 16
    huge_pages: bool = True
    policy: Literal["lru"] = "lru"
    disk_path: Optional[str] = None
    persist: bool = False
    durability: Literal["process", "sync"] = "process"
    write_through: bool = False
    checksums: bool = True

    def __post_init__(self) -> None:
        if self.layout is not None and not isinstance(self.layout, KvLayout):
            raise TypeError(f"layout must be a KvLayout, got {type(self.layout).__name__}")
        if self.block_size is None and self.layout is None:
            raise ValueError("give block_size (bytes) or layout=KvLayout(...)")
        if self.layout is not None:
            lbs = self.layout.block_size
            if self.block_size is not None and self.block_size != lbs:
                raise ValueError(
                    f"block_size={self.block_size} disagrees with layout, which gives {lbs} bytes"
                )
            self.block_size = lbs
        self.block_size = _count("block_size", self.block_size, allow_zero=False)
        for tier in ("host", "disk"):
            blocks, nbytes = getattr(self, f"{tier}_blocks"), getattr(self, f"{tier}_bytes")
            if blocks is not None and nbytes is not None:
                expect = _count(f"{tier}_bytes", nbytes) // self.block_size
                if _count(f"{tier}_blocks", blocks) != expect:
                    raise ValueError(
                        f"{tier}_blocks={blocks} and {tier}_bytes={nbytes} disagree "
                        f"({nbytes} bytes hold {expect} blocks of {self.block_size}); give one"
                    )
            if blocks is None:
                blocks = 0 if nbytes is None else _count(f"{tier}_bytes", nbytes) // self.block_size
            setattr(self, f"{tier}_blocks", _count(f"{tier}_blocks", blocks))
            setattr(self, f"{tier}_bytes", getattr(self, f"{tier}_blocks") * self.block_size)
        if self.host_blocks == 0 and self.disk_blocks == 0:
            raise ValueError("both tiers are empty: give host_blocks/host_bytes or disk_blocks/disk_bytes")
        if self.disk_dir is None:
            if self.disk_blocks:
                import tempfile

                self.disk_dir = tempfile.gettempdir()
        else:
            self.disk_dir = os.fspath(self.disk_dir)
        if self.o_direct not in (True, False, "require"):
            raise ValueError(f'o_direct must be True, False or "require", got {self.o_direct!r}')
        if self.pin not in (True, False, "require"):
            raise ValueError(f'pin must be True, False or "require", got {self.pin!r}')
        if self.preallocate not in ("auto", "zero", "sparse-fallback", "sparse"):
            raise ValueError(f"preallocate must be auto, zero, sparse-fallback or sparse, got {self.preallocate!r}")
        if self.numa_node not in (None, "auto"):
            _count("numa_node", self.numa_node)
        if self.gpu is not None:
            _count("gpu", self.gpu)
        _count("io_depth", self.io_depth, allow_zero=False)
        if self.policy != "lru":
            raise ValueError(f"policy must be 'lru' (the only policy so far), got {self.policy!r}")
        for name in ("persist", "write_through", "checksums", "huge_pages"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.durability not in ("process", "sync"):
            raise ValueError(f"durability must be 'process' or 'sync', got {self.durability!r}")
        if self.disk_path is not None:
            self.disk_path = os.fspath(self.disk_path)
        if self.persist:
            if self.disk_path is None:
                raise ValueError("persist=True needs disk_path= (the store's data file; its index goes beside it)")
            if not self.disk_blocks:
                raise ValueError("persist=True needs a disk tier: give disk_blocks or disk_bytes")
            self.disk_dir = os.path.dirname(os.path.abspath(self.disk_path))
        elif self.disk_path is not None:
            raise ValueError("disk_path is for persistent stores: add persist=True (or use disk_dir=)")

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None, **overrides: Any) -> "Config":
        """Build a Config from ``DYNBLOCK_*`` and Dynamo's ``DYN_KVBM_*`` variables
        (see the module docs for the mapping); ``overrides`` win."""
        e: Mapping[str, str] = os.environ if env is None else env
        kw: Dict[str, Any] = {}
        bs = env_int("DYNBLOCK_BLOCK_SIZE", e, minimum=1)
        if bs is not None:
            kw["block_size"] = bs
        # Every variable is parsed (and so checked) even when another one wins.
        for tier, dyn in (("host", "CPU"), ("disk", "DISK")):
            ours = env_int(f"DYNBLOCK_{tier.upper()}_BLOCKS", e)
            theirs = env_int(f"DYN_KVBM_{dyn}_CACHE_OVERRIDE_NUM_BLOCKS", e)
            blocks = ours if ours is not None else theirs
            nbytes = env_int(f"DYNBLOCK_{tier.upper()}_BYTES", e)
            gb = env_float(f"DYN_KVBM_{dyn}_CACHE_GB", e)
            if blocks is not None:
                kw[f"{tier}_blocks"] = blocks
            elif nbytes is not None:
                kw[f"{tier}_bytes"] = nbytes
            elif gb is not None:
                kw[f"{tier}_bytes"] = int(gb * 10**9)
        d_ours, d_theirs = env_str("DYNBLOCK_DISK_DIR", e), env_str("DYN_KVBM_DISK_CACHE_DIR", e)
        d = d_ours if d_ours is not None else d_theirs
        if d is not None:
            kw["disk_dir"] = d
        if o_direct_disabled(e):
            kw["o_direct"] = False
        zf = env_bool("DYN_KVBM_DISK_ZEROFILL_FALLBACK", e)
        if zf is not None:
            kw["preallocate"] = "auto" if zf else "sparse-fallback"
        node = env_str("DYNBLOCK_NUMA_NODE", e)
        if node is not None:
            if node.strip().lower() == "auto":
                kw["numa_node"] = "auto"
            else:
                kw["numa_node"] = env_int("DYNBLOCK_NUMA_NODE", e)
        if numa_disabled(e):
            kw["numa_node"] = None
        gpu = env_int("DYNBLOCK_GPU", e)
        if gpu is not None:
            kw["gpu"] = gpu
        pin = env_bool("DYNBLOCK_PIN", e)
        if pin is not None:
            kw["pin"] = pin
        depth = env_int("DYNBLOCK_IO_DEPTH", e, minimum=1)
        if depth is not None:
            kw["io_depth"] = depth
        path = env_str("DYNBLOCK_DISK_PATH", e)
        if path is not None:
            kw["disk_path"] = path
        for var, key in (("DYNBLOCK_PERSIST", "persist"), ("DYNBLOCK_WRITE_THROUGH", "write_through"),
                         ("DYNBLOCK_CHECKSUMS", "checksums")):
            v = env_bool(var, e)
            if v is not None:
                kw[key] = v
        dur = env_str("DYNBLOCK_DURABILITY", e)
        if dur is not None:
            if dur.strip().lower() not in ("process", "sync"):
                raise EnvError(f"environment variable DYNBLOCK_DURABILITY={dur!r} must be 'process' or 'sync'")
            kw["durability"] = dur.strip().lower()
        # Sizes given one way in overrides replace the other way from the env.
        for tier in ("host", "disk"):
            if f"{tier}_blocks" in overrides or f"{tier}_bytes" in overrides:
                kw.pop(f"{tier}_blocks", None)
                kw.pop(f"{tier}_bytes", None)
        if "layout" in overrides and "block_size" not in overrides:
            kw.pop("block_size", None)
        kw.update(overrides)
        if "block_size" not in kw and kw.get("layout") is None:
            raise EnvError(
                "no block size: set DYNBLOCK_BLOCK_SIZE (bytes) or pass block_size=/layout= "
                "to Config.from_env()"
            )
        return cls(**kw)

    def replace(self, **changes: Any) -> "Config":
        """A copy with some fields changed (sizes re-resolved)."""
        d = dataclasses.asdict(self)
        d["layout"] = self.layout
        for tier in ("host", "disk"):
            if f"{tier}_blocks" in changes or f"{tier}_bytes" in changes:
                d[f"{tier}_blocks"] = changes.get(f"{tier}_blocks")
                d[f"{tier}_bytes"] = changes.get(f"{tier}_bytes")
            else:
                d[f"{tier}_bytes"] = None
        if "layout" in changes and "block_size" not in changes:
            d["block_size"] = None
        d.update(changes)
        return Config(**d)
