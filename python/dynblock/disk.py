"""The disk tier: fixed-size block slots in one preallocated file."""

from __future__ import annotations

import os
from typing import Any, ClassVar, Literal, Optional, Sequence, Tuple, Union

from . import _core
from ._env import read_table
from ._forward import ReadOnly

ODirectArg = Union[bool, Literal["require"]]
SlotIds = Union[Sequence[int], Any]  # any sequence of ints or a numpy integer array

#: Defaults of every setting, from the engine (``rust/settings.rs``).
DEFAULTS = _core.settings_defaults()


def _apply_env(o_direct: ODirectArg) -> ODirectArg:
    """The environment switch: DYNBLOCK_DISABLE_O_DIRECT (or Dynamo's name)
    turns ``o_direct=True`` off; ``False`` needs no look at the environment."""
    if o_direct is False:
        return o_direct
    switch = read_table(tiers_only=True).get("o_direct")
    if switch is not None:
        if o_direct == "require":
            raise ValueError(
                f'o_direct="require" conflicts with the environment, which disables O_DIRECT '
                f"({switch[0]}); unset it"
            )
        if o_direct is True:
            return False
    return o_direct


class DiskStorage:
    """``num_blocks`` slots of ``block_size`` bytes in one file.

    ``directory_or_path`` is a directory (the default, anonymous file: made
    with ``O_TMPFILE``, or created and unlinked at once where that is not
    supported, so nothing is left behind even after ``kill -9``), or, with
    ``persist=True``, a file path that is created (0600, no symlink following)
    or reopened. A persistent file starts with a header naming its geometry
    and a random store id (``data_offset`` bytes before slot 0); an existing
    file without one is never adopted, a store reopened with other
    ``num_blocks``/``block_size`` is refused naming both, and existing files
    must belong to this user with no group/other permissions (0600).

    ``o_direct``: True (default) uses O_DIRECT and falls back to buffered I/O
    when the filesystem refuses it (``fallback_reason`` says why, and one
    warning is logged on the ``dynblock.disk`` logger); False or the
    environment variable ``DYNBLOCK_DISABLE_O_DIRECT`` (or Dynamo's
    ``DYN_KVBM_DISK_DISABLE_O_DIRECT``) turns it off; ``"require"`` raises
    :class:`~dynblock.ODirectError` instead of falling back.

    ``preallocate``: ``"auto"`` reserves the space with ``fallocate`` and
    zero-fills where that is unsupported; ``"zero"`` always zero-fills;
    ``"sparse-fallback"`` leaves a sparse file where ``fallocate`` is
    unsupported; ``"sparse"`` never reserves. Both sparse forms log a warning:
    ENOSPC can then come during writes. Before anything is created, free
    space is compared with the file size (:class:`~dynblock.CapacityError`).
    Space that ``fallocate`` reserved is marked unwritten (ext4, XFS): the
    first direct write to each part of it also converts that part, which
    here costs about a third of the write throughput (2 MiB blocks: 1.2-1.6
    GiB/s first writes, 1.8-2.4 GiB/s later ones). ``"zero"`` writes the
    whole file once at creation instead (opening a 4 GiB file took 2.8 s
    here), so first writes run as fast as later ones: worth it for a
    persistent store (created once) or where writes must be fast from the
    start.

    ``io_depth`` I/Os are kept in flight per batch (default: from the block
    size, about 4 MiB in flight on io_uring (16 to 64), 2 MiB on the worker
    pool (16 to 32 threads), no more than the device's request queue; the
    :attr:`io_depth` property says how many); adjacent slots in a batch are
    coalesced into I/Os of up to ``max_io_bytes``. ``engine`` says what
    keeps them in flight for direct I/O: ``"auto"`` (default) an io_uring ring
    driven by the calling thread where the kernel allows io_uring (no thread
    wake-up per I/O: less CPU per byte at small blocks), the worker pool
    otherwise; ``"threads"`` always the pool of ``io_depth`` threads;
    ``"io_uring"`` the ring or an ``OSError`` at open saying why not. Buffered
    I/O, padded slots and unaligned memory always use the pool. The
    :attr:`engine` property says which one runs.

    A persistent file is locked (``flock``) while open: a second open, in this
    or another process, raises :class:`~dynblock.StoreLockedError`.
    ``lock=False`` skips the lock, for tools that open one file twice on
    purpose (the bench).
    """

    def __init__(
        self,
        directory_or_path: Union[str, "os.PathLike[str]"],
        num_blocks: int,
        block_size: int,
        *,
        o_direct: ODirectArg = True,
        persist: bool = False,
        preallocate: Literal["auto", "zero", "sparse-fallback", "sparse"] = DEFAULTS["preallocate"],
        io_depth: Optional[int] = None,
        max_io_bytes: int = DEFAULTS["max_io_bytes"],
        alignment: Optional[Tuple[int, int]] = None,
        lock: bool = True,
        worker_nice: int = DEFAULTS["worker_nice"],
        engine: Literal["auto", "threads", "io_uring"] = DEFAULTS["disk_engine"],
    ) -> None:
        # Every argument is checked once, by the engine (rust/settings.rs).
        path = os.fspath(directory_or_path)
        self._s = _core.DiskStorage(
            path,
            num_blocks,
            block_size,
            o_direct=_apply_env(o_direct),
            persist=persist,
            preallocate=preallocate,
            io_depth=io_depth,
            max_io_bytes=max_io_bytes,
            alignment=alignment,
            lock=bool(lock),
            worker_nice=worker_nice,
            engine=engine,
        )

    # --- I/O -------------------------------------------------------------
    def write_blocks(self, slot_ids: SlotIds, src: Any) -> None:
        """Write ``len(slot_ids)`` blocks, stored back to back in ``src``."""
        self._s.write_blocks(slot_ids, src)

    def read_blocks(self, slot_ids: SlotIds, dst: Any) -> None:
        """Read the slots into ``dst`` (writable, ``len(slot_ids) * block_size`` bytes)."""
        self._s.read_blocks(slot_ids, dst)

    def write_block(self, slot_id: int, src: Any) -> None:
        self._s.write_blocks((slot_id,), src)

    def read_block(self, slot_id: int, dst: Any) -> None:
        self._s.read_blocks((slot_id,), dst)

    def sync(self) -> None:
        """``fdatasync`` the file: written blocks survive a power loss."""
        self._s.sync()

    def drop_page_cache(self) -> None:
        """Flush and evict this file's pages from the page cache (cold reads)."""
        self._s.drop_page_cache()

    def register_buffer(self, buf: Any) -> Optional[int]:
        """Register ``buf`` (long-lived memory that many batches read from or
        write into: an engine's staging buffer) with the io_uring engine:
        its direct I/O then skips pinning the buffer's pages for every
        operation (the kernel pins them once). The buffer is held (kept
        alive, not resizable) until :meth:`unregister_buffer` or
        :meth:`close`. Returns the registration's id, or None when this
        storage has no io_uring engine, or for memory on huge pages
        (hugetlbfs, or a mapping that may get transparent huge pages, from
        ``/proc/self/smaps``): pinning those per I/O is cheap, and
        registering them measured costlier; and None where the kernel
        refuses to pin it (over ``RLIMIT_MEMLOCK`` without
        ``CAP_IPC_LOCK``). The I/O then goes as it did, and
        ``registration`` says why."""
        return self._s.register_buffer(buf)

    def unregister_buffer(self, registration: int) -> bool:
        """Forget a registration (and let go of its buffer); False when it
        is not one."""
        if isinstance(registration, bool) or not isinstance(registration, int):
            raise TypeError(f"registration must be an id from register_buffer, got {registration!r}")
        return self._s.unregister_buffer(registration)

    def close(self) -> None:
        """Close the file (waits for batches in flight); forgets every
        registered buffer. Idempotent."""
        self._s.close()

    def __enter__(self) -> "DiskStorage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- what is in use: read-only, declared once (READ_ONLY lists them) --
    _NATIVE = "_s"
    READ_ONLY: ClassVar[Tuple[str, ...]] = ()
    num_blocks = ReadOnly[int](lambda self: self._s.layout[0])
    block_size = ReadOnly[int](lambda self: self._s.layout[1])
    slot_stride = ReadOnly[int](lambda self: self._s.layout[2],
                                "Distance between slots: block_size rounded up to the offset alignment.")
    data_offset = ReadOnly[int](doc="Bytes before slot 0: a persistent file's header (0 when anonymous).")
    alignment = ReadOnly[int](lambda self: self._s.alignment_info[1],
                              "Direct-I/O offset (and length) alignment of this file, in bytes.")
    memory_alignment = ReadOnly[int](lambda self: self._s.alignment_info[0],
                                     "Direct-I/O buffer address alignment of this file, in bytes.")
    alignment_source = ReadOnly[str](
        lambda self: self._s.alignment_info[2],
        "Where the alignment came from: statx, logical_block_size, default or override.")
    o_direct = ReadOnly[bool](doc="Whether O_DIRECT is in use right now.")
    fallback_reason = ReadOnly[Optional[str]](doc="Why O_DIRECT is not in use, or None.")
    path = ReadOnly[str](lambda self: str(self._s.path), "The data file (its name when anonymous).")
    anonymous = ReadOnly[bool]()
    fs_type = ReadOnly[str]()
    io_depth = ReadOnly[int]()
    engine = ReadOnly[str](doc='The engine running direct I/O batches: "io_uring" or "threads".')
    file_size = ReadOnly[int]()
    preallocation = ReadOnly[str](doc="How the space was reserved: fallocate, zero-fill, sparse, or existing.")
    registration = ReadOnly[Tuple[int, int, Optional[str]]](
        doc="(bytes registered, direct I/Os that used registered memory, why the last "
            "buffer was left unregistered or the kernel refused one, or None).")
    closed = ReadOnly[bool]()

    def __repr__(self) -> str:
        mode = "O_DIRECT" if self.o_direct else "buffered"
        return (
            f"DiskStorage(path={self.path!r}, num_blocks={self.num_blocks}, "
            f"block_size={self.block_size}, slot_stride={self.slot_stride}, "
            f"alignment={self.alignment}, mode={mode}, fs={self.fs_type}"
            f"{', closed' if self.closed else ''})"
        )
