"""The host tier: NUMA-placed, pinned host memory in fixed-size slots."""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Dict, Literal, Optional, Tuple, Union, cast

from . import _core
from ._env import read_table
from ._forward import ReadOnly
from .topology import resolve_gpu

log = logging.getLogger("dynblock.host")

PinArg = Union[bool, Literal["require"]]
NumaArg = Union[int, None, Literal["auto"]]


#: Defaults of every setting, from the engine (``rust/settings.rs``).
DEFAULTS = _core.settings_defaults()


def resolve_numa_node(
    numa_node: NumaArg,
    gpu: Optional[int],
    *,
    nvidia_smi: str = "nvidia-smi",
    sysfs_root: str = "/sys",
) -> "tuple[Optional[int], str]":
    """(node to bind to or None, why). The environment switch
    (DYNBLOCK_DISABLE_NUMA / DYN_MEMORY_DISABLE_NUMA) is read only when
    binding was asked for."""
    if numa_node is None:
        return None, "numa_node=None: no binding asked"
    if numa_node != "auto":
        if isinstance(numa_node, str):
            raise TypeError(f'numa_node must be an int, None or "auto", got {numa_node!r}')
        numa_node = _core.check_setting("numa_node", numa_node)
    if gpu is not None:
        gpu = _core.check_setting("gpu", gpu)
    switch = read_table(tiers_only=True).get("numa_node")
    if switch is not None:
        return None, f"NUMA binding disabled by {switch[0]}"
    if numa_node == "auto":
        if gpu is None:
            return None, 'numa_node="auto" without gpu: no GPU to be near, no binding'
        r = resolve_gpu(gpu, nvidia_smi=nvidia_smi, sysfs_root=sysfs_root)
        return r.numa_node, f"GPU {gpu}: {r.reason}"
    return numa_node, f"numa_node={numa_node} asked"


class HostStorage:
    """``num_blocks`` slots of ``block_size`` bytes in host memory.

    The memory is one anonymous mapping (slots aligned to ``alignment``,
    4096 by default, so disk I/O into them needs no bounce buffer), bound to
    ``numa_node`` with ``mbind`` (``MPOL_BIND``, else ``MPOL_PREFERRED``, else
    no policy; ``policy`` says which), populated by one thread per allowed CPU
    of that node, and locked with ``mlock`` when ``pin`` is true.

    ``numa_node="auto"`` uses the node nearest ``gpu`` (a CUDA ordinal, after
    ``CUDA_VISIBLE_DEVICES``) from ``nvidia-smi topo -m`` and sysfs, and binds
    nothing when that cannot be known. ``DYNBLOCK_DISABLE_NUMA`` (or Dynamo's
    ``DYN_MEMORY_DISABLE_NUMA``) turns binding off.

    ``pin=True`` falls back to unpinned memory with one warning naming the
    limit, the size and the fix when ``RLIMIT_MEMLOCK`` is too low and the
    process lacks ``CAP_IPC_LOCK``; ``pin="require"`` raises ``PinError``.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        numa_node: NumaArg = "auto",
        gpu: Optional[int] = None,
        pin: PinArg = DEFAULTS["pin"],
        populate_threads: int = DEFAULTS["populate_threads"],
        huge_pages: bool = DEFAULTS["huge_pages"],
        alignment: int = DEFAULTS["alignment"],
        cuda_register: bool = False,
        nvidia_smi: str = "nvidia-smi",
        sysfs_root: str = "/sys",
        worker_nice: int = DEFAULTS["worker_nice"],
    ) -> None:
        # Every argument is checked once, by the engine (rust/settings.rs).
        node, self._numa_reason = resolve_numa_node(
            numa_node, gpu, nvidia_smi=nvidia_smi, sysfs_root=sysfs_root
        )
        self._h = _core.HostStorage(
            num_blocks,
            block_size,
            numa_node=node,
            pin=pin,
            populate_threads=populate_threads,
            huge_pages=huge_pages,
            alignment=alignment,
            sysfs_root=sysfs_root,
            worker_nice=worker_nice,
        )
        self._cuda = (False, "not asked (cuda_register=False)")
        self._registered: Optional[tuple] = None
        if cuda_register:
            self.register_cuda()

    def register_cuda(self) -> bool:
        """Register the memory with CUDA for DMA; False (and ``cuda_reason``) when impossible."""
        from .cuda import register_host_memory

        ptr, n = self._h.data_ptr, self._h.nbytes
        ok, why = register_host_memory(ptr, n)
        if ok:
            self._registered = (ptr, n)
        self._cuda = (ok, why)
        return ok

    # --- data -------------------------------------------------------------
    def write_blocks(self, slot_ids: Any, src: Any) -> None:
        """Copy ``len(slot_ids)`` blocks from ``src`` into the slots (parallel, GIL released)."""
        self._h.write_blocks(slot_ids, src)

    def read_blocks(self, slot_ids: Any, dst: Any) -> None:
        """Copy the slots' blocks into ``dst``."""
        self._h.read_blocks(slot_ids, dst)

    def block(self, slot_id: int) -> memoryview:
        """Writable zero-copy view of one slot (``numpy.frombuffer`` works)."""
        return memoryview(cast(Any, self._h.block(slot_id)))

    def view(self) -> memoryview:
        """Writable zero-copy view of the whole tier."""
        return memoryview(cast(Any, self._h.view()))

    def placement(self) -> Dict[int, int]:
        """Pages per NUMA node, asked of the kernel (``move_pages``); -1 counts
        pages that are not resident."""
        return dict(self._h.placement())

    def close(self) -> None:
        """Release the memory once no view points to it any more. Idempotent."""
        if self._registered is not None:
            from .cuda import unregister_host_memory

            unregister_host_memory(*self._registered)
            self._registered = None
        self._h.close()

    def __enter__(self) -> "HostStorage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- what happened: read-only, declared once (READ_ONLY lists them) ---
    _NATIVE = "_h"
    READ_ONLY: ClassVar[Tuple[str, ...]] = ()
    num_blocks = ReadOnly[int](lambda self: self._h.layout[0])
    block_size = ReadOnly[int](lambda self: self._h.layout[1])
    slot_stride = ReadOnly[int](lambda self: self._h.layout[2], "Distance between slots.")
    nbytes = ReadOnly[int]()
    numa_node = ReadOnly[Optional[int]](doc="The node the memory policy names, or None when nothing is bound.")
    numa_reason = ReadOnly[str](lambda self: self._numa_reason, "Why that node (or none).")
    policy = ReadOnly[str](doc="``bind``, ``preferred`` or ``none``.")
    pinned = ReadOnly[bool]()
    huge_pages = ReadOnly[bool]()
    populate_threads = ReadOnly[int]()
    populate_seconds = ReadOnly[float]()
    cuda_registered = ReadOnly[bool](lambda self: self._cuda[0], "Registered with CUDA for DMA.")
    cuda_reason = ReadOnly[str](lambda self: self._cuda[1], "Why (or why not) registered with CUDA.")
    closed = ReadOnly[bool]()

    def __repr__(self) -> str:
        return (
            f"HostStorage(num_blocks={self.num_blocks}, block_size={self.block_size}, "
            f"numa_node={self.numa_node}, policy={self.policy}, pinned={self.pinned}, "
            f"huge_pages={self.huge_pages}{', closed' if self.closed else ''})"
        )
