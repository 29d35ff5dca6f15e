"""Configuration of a :class:`~dynblock.BlockManager`.

``Config(...)`` takes sizes in blocks or bytes and resolves them at
construction; ``repr(config)`` shows the resolved values. ``Config.from_env()``
reads ``DYNBLOCK_*`` variables and Dynamo's ``DYN_KVBM_*`` names so a
deployment can switch without rewriting its environment.

Every field's default and check live in the engine (``rust/settings.rs``,
reached through ``dynblock._core``): a value is refused with the same message
here as by the tier classes.

Environment mapping: every variable dynblock reads is listed once, in the
engine's settings table (``rust/settings.rs``, ``ENV``); this table is built
from it. Where several variables set one field, the first one set in this
order wins (``DYNBLOCK_*`` over Dynamo's name, whatever unit they use), and a
switch that disables NUMA binding wins over ``DYNBLOCK_NUMA_NODE``. Keyword
arguments to ``from_env`` win over all of them. Tier sizes, highest
precedence first: ``DYNBLOCK_<TIER>_BLOCKS``, ``DYNBLOCK_<TIER>_BYTES``,
Dynamo's ``*_OVERRIDE_NUM_BLOCKS``, Dynamo's ``*_CACHE_GB`` (decimal GB, as
Dynamo reads it). ``DiskStorage`` and ``HostStorage`` used on their own honour
the two disabling switches (O_DIRECT, NUMA) too.

{ENV_TABLE}

Booleans accept exactly ``1/true/yes/on`` and ``0/false/no/off``; integers
are plain ASCII decimal digits; any other value raises
:class:`~dynblock.EnvError` naming the variable and the accepted form.
Surrounding spaces are ignored.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Literal, Mapping, Optional, Union

from . import _core
from ._env import EnvError, read_table, table_rst

if __doc__:
    __doc__ = __doc__.replace("{ENV_TABLE}", table_rst())

__all__ = ["Config", "KvLayout", "canonical_dtype"]

#: Defaults of every setting, from the engine (``rust/settings.rs``).
DEFAULTS: Dict[str, Any] = _core.settings_defaults()

# Canonical dtype name -> bytes per element, and the aliases of each name.
_DTYPE_BYTES = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "int8": 1, "uint8": 1,
}
_DTYPE_ALIASES = {
    "fp32": "float32", "float": "float32",
    "fp16": "float16", "half": "float16",
    "bf16": "bfloat16",
    "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "float8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
}


def canonical_dtype(dtype: Any) -> str:
    """The one name of a KV dtype: ``"bf16"``, ``"bfloat16"`` and
    ``torch.bfloat16`` are all ``"bfloat16"``; ``np.float16`` and ``"fp16"``
    are ``"float16"``; ``"fp8"`` means ``float8_e4m3fn``."""
    name = str(dtype).replace("torch.", "").strip().lower()
    name = _DTYPE_ALIASES.get(name, name)
    if name in _DTYPE_BYTES:
        return name
    try:
        import numpy as np

        return str(np.dtype(dtype).name)
    except TypeError:
        raise ValueError(
            f"layout dtype {dtype!r} is not known; use e.g. 'bfloat16', 'float16', 'float8_e4m3fn'"
        ) from None


def _itemsize(dtype: Any) -> int:
    name = canonical_dtype(dtype)
    if name in _DTYPE_BYTES:
        return _DTYPE_BYTES[name]
    import numpy as np

    return int(np.dtype(name).itemsize)


def _count(name: str, v: Any, *, allow_zero: bool = True) -> int:
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    v = v.__index__()
    if v < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '>= 1'}, got {v}")
    return int(v)


_REMOTE_SCHEMES = ("redis://", "rediss://", "redis+cluster://", "rediss+cluster://")


#: ``url`` with its password replaced by ``***`` (for messages and reprs): the remote
#: tier's own function, so a password is hidden the same way everywhere.
redact_url = _core.redact_url


def split_engine_config(extra: Optional[Mapping[str, Any]], *, where: str, own: Iterable[str],
                        own_are: str, derived_from: str) -> "tuple[Dict[str, Any], Dict[str, Any]]":
    """An engine's extra config (``where``, for messages) -> (``Config``
    fields, the engine's own keys ``own``). ``block_size`` and ``layout``
    come from the engine (``derived_from``) and are refused; so is any other
    key, naming what it is neither of."""
    own = set(own)
    names = {f.name for f in dataclasses.fields(Config)}
    fields: Dict[str, Any] = {}
    mine: Dict[str, Any] = {}
    for k, v in (extra or {}).items():
        if k in own:
            mine[k] = v
        elif k in ("block_size", "layout"):
            raise ValueError(f"{where}[{k!r}]: dynblock derives {k} from {derived_from}; remove it")
        elif k in names:
            fields[k] = v
        else:
            raise ValueError(f"{where}[{k!r}] is neither a dynblock.Config field nor {own_are} "
                             f"({', '.join(sorted(own))})")
    return fields, mine


@dataclass(frozen=True)
class KvLayout:
    """Shape of one KV block: ``num_layers x outer_dim x page_size x inner_dim``
    elements of ``dtype``. ``outer_dim`` is 2 for separate K and V, 1 for MLA;
    ``page_size`` is tokens per block; ``inner_dim`` is ``kv_heads x head_dim``.

    ``per_layer=True`` describes a store that keeps each layer of a KV block
    as its own block (an engine that saves and loads layer by layer, as the
    vLLM connector does): a block is then ``outer_dim x page_size x inner_dim``
    elements, and ``num_layers`` still belongs to the layout's identity, so a
    persistent store made for a model of another depth is refused at open."""

    num_layers: int
    outer_dim: int
    page_size: int
    inner_dim: int
    dtype: Any = "bfloat16"
    per_layer: bool = False

    def __post_init__(self) -> None:
        for f in ("num_layers", "outer_dim", "page_size", "inner_dim"):
            _count(f"layout.{f}", getattr(self, f), allow_zero=False)
        if self.outer_dim not in (1, 2):
            raise ValueError(f"layout.outer_dim must be 2 (K and V) or 1 (MLA), got {self.outer_dim}")
        _itemsize(self.dtype)
        if not isinstance(self.per_layer, bool):
            raise TypeError(f"layout.per_layer must be True or False, got {self.per_layer!r}")

    @property
    def block_size(self) -> int:
        layers = 1 if self.per_layer else self.num_layers
        return layers * self.outer_dim * self.page_size * self.inner_dim * _itemsize(self.dtype)


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
    ``kill -9``: every block whose disk write completed is recovered. A store
    that was given namespaces also keeps their names beside the index
    (``disk_path + ".index.namespaces"``).
    ``durability="process"`` (default) survives the death of the process;
    ``"sync"`` also fdatasyncs data then index at every batch, surviving power
    loss (or call ``sync()`` at the points you choose). ``write_through=True``
    makes ``put`` write to disk too, so blocks in the host tier also survive.
    ``write_behind`` (default on, with both tiers) keeps the least recent
    half of the host tier (at most half the disk tier's size) written to
    disk in the background, so a ``put``
    into a full host tier evicts without waiting for disk writes;
    ``BlockManager.flush()`` waits for it.
    ``disk_admission`` says which blocks leaving the host tier get a disk copy:
    ``"all"`` (default) or ``"reuse"``: only a block asked for again while in
    the host tier (a hit, a ``touch``, a ``put`` of it), or one turned away
    before and put again (its second sighting; the last ``host_blocks +
    disk_blocks`` turned away are remembered, by a persistent store across
    restarts and ``kill -9`` too). The rest leave without a disk
    write, counted in ``stats()["disk_not_admitted"]``: fewer SSD writes for
    blocks nobody asks for twice. Write-behind and a closing persistent store
    write only what it admits; it cannot be combined with ``write_through``.
    ``host_eviction`` and ``disk_eviction`` say which block a full tier gives
    up: ``"lru"`` (default), its least recently used block, or ``"s3fifo"``:
    new blocks wait in a small FIFO queue and leave it unless asked for again
    meanwhile; blocks asked for again live in a main FIFO queue that gives
    each one asked for since its last pass another pass. One-off blocks
    (scans, documents read once) leave early without pushing out blocks that
    are reused. ``python -m dynblock.bench --workloads policy`` compares them
    on serving traces (the exact rules: ``rust/manager/mod.rs``).
    ``io_depth`` is the disk I/Os in flight per batch (default: from the
    block size, the engine and the device, 16 to 64; see
    :class:`~dynblock.DiskStorage`).
    ``disk_engine`` says what keeps the disk tier's direct I/Os in flight:
    ``"auto"`` (default) an io_uring ring the calling thread drives, where
    the kernel allows io_uring, else a pool of ``io_depth`` threads;
    ``"threads"`` always the pool; ``"io_uring"`` the ring or an ``OSError``
    saying why not (see :class:`~dynblock.DiskStorage`).
    ``worker_nice`` (default 5, 0-19) is the nice value of the threads that
    copy and do disk I/O in the background: a busy CPU goes to the engine's
    own threads (its scheduler loop) first; above 0 they also take a 10 ms
    time slice (Linux 6.12+), so an engine thread that wakes preempts them at
    once; 0 gives them the caller's priority.
    ``checksums`` (default on) verifies a CRC32C of every block read from disk:
    a mismatch is a miss, never wrong bytes.
    ``preallocate`` says how the disk tier's file reserves its space (see
    :class:`~dynblock.DiskStorage`): ``"zero"`` writes the whole file once
    when it is created (opening takes as long as writing it), after which
    every disk write runs at overwrite speed from the first; the default
    ``"auto"`` (``fallocate``) is instant, but on ext4 (and XFS) each slot's
    first write then costs more (about 0.6-0.7x the throughput of later ones
    here).
    """

    block_size: Optional[int] = None
    layout: Optional[KvLayout] = None
    host_blocks: Optional[int] = None
    disk_blocks: Optional[int] = None
    host_bytes: Optional[int] = None
    disk_bytes: Optional[int] = None
    disk_dir: Optional[str] = None
    o_direct: Union[bool, Literal["require"]] = DEFAULTS["o_direct"]
    preallocate: Literal["auto", "zero", "sparse-fallback", "sparse"] = DEFAULTS["preallocate"]
    numa_node: Union[int, None, Literal["auto"]] = "auto"
    gpu: Optional[int] = None
    pin: Union[bool, Literal["require"]] = DEFAULTS["pin"]
    io_depth: Optional[int] = None
    disk_engine: Literal["auto", "threads", "io_uring"] = DEFAULTS["disk_engine"]
    worker_nice: int = DEFAULTS["worker_nice"]
    huge_pages: bool = DEFAULTS["huge_pages"]
    disk_path: Optional[str] = None
    persist: bool = DEFAULTS["persist"]
    durability: Literal["process", "sync"] = DEFAULTS["durability"]
    write_through: bool = DEFAULTS["write_through"]
    write_behind: bool = DEFAULTS["write_behind"]
    disk_admission: Literal["all", "reuse"] = DEFAULTS["disk_admission"]
    host_eviction: Literal["lru", "s3fifo"] = DEFAULTS["host_eviction"]
    disk_eviction: Literal["lru", "s3fifo"] = DEFAULTS["disk_eviction"]
    checksums: bool = DEFAULTS["checksums"]
    remote: Optional[str] = dataclasses.field(default=None, repr=False)
    remote_prefix: str = DEFAULTS["remote_prefix"]
    remote_ttl_s: Optional[int] = None
    remote_timeout_ms: int = DEFAULTS["remote_timeout_ms"]
    remote_write: Literal["async", "sync", "off"] = DEFAULTS["remote_write"]
    remote_ca_file: Optional[str] = None
    remote_secret: Optional[str] = dataclasses.field(default=None, repr=False)
    remote_queue_bytes: int = DEFAULTS["remote_queue_bytes"]
    remote_check_threads: Optional[int] = None

    def __post_init__(self) -> None:
        check = _core.check_setting
        if self.layout is not None and not isinstance(self.layout, KvLayout):
            raise TypeError(f"layout must be a KvLayout, got {type(self.layout).__name__}")
        if self.block_size is None and self.layout is None:
            raise ValueError("give block_size (bytes) or layout=KvLayout(...)")
        if self.layout is not None:
            lbs = self.layout.block_size
            if self.block_size is not None and check("block_size", self.block_size) != lbs:
                raise ValueError(
                    f"block_size={self.block_size} disagrees with layout, which gives {lbs} bytes"
                )
            self.block_size = lbs
        bs = self.block_size = check("block_size", self.block_size)
        for tier in ("host", "disk"):
            blocks, nbytes = getattr(self, f"{tier}_blocks"), getattr(self, f"{tier}_bytes")
            if nbytes is not None:
                nbytes = check(f"{tier}_bytes", nbytes)
                if 0 < nbytes < bs:
                    raise ValueError(
                        f"{tier}_bytes={nbytes} is less than one block (block_size {bs}): give 0 "
                        f"to have no {tier} tier, or at least {bs} bytes"
                    )
            if blocks is not None:
                blocks = check(f"{tier}_blocks", blocks)
                if nbytes is not None and blocks != nbytes // bs:
                    raise ValueError(
                        f"{tier}_blocks={blocks} and {tier}_bytes={nbytes} disagree "
                        f"({nbytes} bytes hold {nbytes // bs} blocks of {bs}); give one"
                    )
            if blocks is None:
                blocks = 0 if nbytes is None else nbytes // bs
            setattr(self, f"{tier}_blocks", check(f"{tier}_blocks", blocks))
            setattr(self, f"{tier}_bytes", check(f"{tier}_bytes", blocks * bs))
        if self.host_blocks == 0 and self.disk_blocks == 0:
            raise ValueError("both tiers are empty: give host_blocks/host_bytes or disk_blocks/disk_bytes")
        if self.io_depth is not None:
            self.io_depth = check("io_depth", self.io_depth)
        for name in ("o_direct", "pin", "preallocate", "disk_engine", "worker_nice",
                     "durability", "persist", "write_through", "write_behind", "checksums", "huge_pages",
                     "disk_admission", "host_eviction", "disk_eviction"):
            setattr(self, name, check(name, getattr(self, name)))
        if self.disk_admission != "all" and self.write_through:
            raise ValueError(
                f"disk_admission={self.disk_admission!r} and write_through=True disagree: write-through "
                "writes every new block to disk at put; keep disk_admission='all' with it"
            )
        if self.numa_node not in (None, "auto"):
            self.numa_node = check("numa_node", self.numa_node)
        if self.gpu is not None:
            self.gpu = check("gpu", self.gpu)
        self._check_remote()
        if self.disk_path is not None:
            self.disk_path = os.fspath(self.disk_path)
        if self.persist:
            if self.disk_path is None:
                raise ValueError("persist=True needs disk_path= (the store's data file; its index goes beside it)")
            if not self.disk_blocks:
                raise ValueError("persist=True needs a disk tier: give disk_blocks or disk_bytes")
            where = os.path.dirname(os.path.abspath(self.disk_path))
            if self.disk_dir is not None and os.path.abspath(os.fspath(self.disk_dir)) != where:
                raise ValueError(
                    f"disk_dir={self.disk_dir!r} and disk_path={self.disk_path!r} disagree: a "
                    "persistent store lives at disk_path; leave disk_dir unset"
                )
            self.disk_dir = where
        elif self.disk_path is not None:
            raise ValueError("disk_path is for persistent stores: add persist=True (or use disk_dir=)")
        if self.disk_dir is None:
            if self.disk_blocks:
                import tempfile

                self.disk_dir = tempfile.gettempdir()
        else:
            self.disk_dir = os.fspath(self.disk_dir)

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None, **overrides: Any) -> "Config":
        """Build a Config from ``DYNBLOCK_*`` and Dynamo's ``DYN_KVBM_*`` variables
        (see the module docs for the mapping); ``overrides`` win."""
        e: Mapping[str, str] = os.environ if env is None else env
        found = read_table(e)
        kw: Dict[str, Any] = {field: value for field, (_, value) in found.items()}
        src: Dict[str, str] = {field: var for field, (var, _) in found.items()}
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
        try:
            return cls(**kw)
        except (ValueError, TypeError) as ex:
            # A value the variables gave is refused: name the variable, not only the field.
            text = str(ex)
            for key, var in src.items():
                # Messages begin with the field they are about.
                if key not in overrides and re.match(rf"{key}(?!\w)", text):
                    shown = "***" if key in ("remote", "remote_secret") else repr(e[var])
                    raise EnvError(f"environment variable {var}={shown}: {text}") from None
            raise

    def _check_remote(self) -> None:
        if self.remote is not None:
            if not isinstance(self.remote, str):
                raise TypeError(f"remote must be a URL string, got {type(self.remote).__name__}")
            self.remote = self.remote.strip()
            if not self.remote.startswith(_REMOTE_SCHEMES):
                raise ValueError(
                    f"remote must be a redis://[user:password@]host:port[/db], rediss:// (TLS) or "
                    f"redis+cluster://host:port[,host:port...] URL, got {redact_url(self.remote)!r}")
        if not isinstance(self.remote_prefix, str) or not self.remote_prefix \
                or any(c.isspace() for c in self.remote_prefix):
            raise ValueError(f"remote_prefix must be a non-empty string without spaces, "
                             f"got {self.remote_prefix!r}")
        check = _core.check_setting
        if self.remote_ttl_s is not None:
            self.remote_ttl_s = check("remote_ttl_s", self.remote_ttl_s)
        self.remote_timeout_ms = check("remote_timeout_ms", self.remote_timeout_ms)
        self.remote_queue_bytes = check("remote_queue_bytes", self.remote_queue_bytes)
        if self.remote_check_threads is not None:
            self.remote_check_threads = check("remote_check_threads", self.remote_check_threads)
        self.remote_write = check("remote_write", self.remote_write)
        if self.remote_ca_file is not None:
            self.remote_ca_file = os.fspath(self.remote_ca_file)
        if self.remote_secret is not None:
            if not isinstance(self.remote_secret, str) or not self.remote_secret:
                raise ValueError("remote_secret must be a non-empty string (or None: values "
                                 "checked by CRC32C only)")
            if self.remote is None:
                raise ValueError("remote_secret is set but remote is not: the secret "
                                 "authenticates the remote tier's values")

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "remote":
                v = None if v is None else redact_url(v)
            elif f.name == "remote_secret" and v is not None:
                v = "***"
            parts.append(f"{f.name}={v!r}")
        return f"Config({', '.join(parts)})"

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
        if ("persist" in changes or "disk_path" in changes) and "disk_dir" not in changes:
            d["disk_dir"] = None  # derived from disk_path again (or the default)
        d.update(changes)
        return Config(**d)
