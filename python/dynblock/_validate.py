"""Argument checks shared by the public classes: clear messages, no I/O."""

from __future__ import annotations

import operator
from typing import Any


def positive_int(name: str, value: Any, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    v = operator.index(value)
    lo = 0 if allow_zero else 1
    if v < lo:
        what = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{name} must be {what} integer, got {v}")
    return v
