"""Aligned host buffers: the zero-copy path for direct I/O.

numpy's large arrays come from ``malloc`` and are usually only 16-byte
aligned, so O_DIRECT I/O from them goes through bounce buffers. Arrays from
:func:`aligned_empty` start on a page (or any power-of-two) boundary.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["aligned_empty", "is_aligned"]


def aligned_empty(nbytes: int, alignment: int = 4096, dtype: Any = np.uint8) -> np.ndarray:
    """An uninitialised 1-D array of ``nbytes`` bytes whose data starts at a
    multiple of ``alignment``."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be a non-negative int, got {nbytes!r}")
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a power of two, got {alignment}")
    dt = np.dtype(dtype)
    if nbytes % dt.itemsize:
        raise ValueError(f"nbytes {nbytes} is not a multiple of {dt}'s size {dt.itemsize}")
    raw = np.empty(nbytes + alignment, dtype=np.uint8)
    off = (-raw.ctypes.data) % alignment
    return raw[off : off + nbytes].view(dt)


def is_aligned(buf: Any, alignment: int = 4096) -> bool:
    """Does the buffer's data start at a multiple of ``alignment``?"""
    return np.asarray(buf).ctypes.data % alignment == 0
