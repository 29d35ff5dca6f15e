"""Strict parsing of environment variables.

Booleans accept exactly ``1/true/yes/on`` and ``0/false/no/off``
(case-insensitive, surrounding spaces ignored); integers are plain ASCII
decimal digits. Anything else is an error that names the variable. Unlike
Dynamo, ``=false`` means false, and an empty value is an error rather than
"set".
"""

from __future__ import annotations

import math
import os
import re
from typing import Mapping, Optional

_DECIMAL = re.compile(r"[0-9]+")
_NUMBER = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class EnvError(ValueError):
    """An environment variable holds a value that is not accepted."""


def parse_bool(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise EnvError(
        f"environment variable {name}={value!r} is not a boolean; "
        "accepted: 1/true/yes/on or 0/false/no/off"
    )


def env_bool(name: str, env: Optional[Mapping[str, str]] = None) -> Optional[bool]:
    """The boolean value of ``name``, or None when unset."""
    e = os.environ if env is None else env
    if name not in e:
        return None
    return parse_bool(name, e[name])


def env_int(name: str, env: Optional[Mapping[str, str]] = None, *, minimum: int = 0) -> Optional[int]:
    e = os.environ if env is None else env
    if name not in e:
        return None
    raw = e[name].strip()
    # Plain ASCII digits only: int() would also take "1_000", "+5" and other scripts' digits.
    if not _DECIMAL.fullmatch(raw):
        raise EnvError(
            f"environment variable {name}={e[name]!r} is not an integer; "
            f"expected a whole number >= {minimum} in plain decimal digits"
        )
    v = int(raw, 10)
    if v < minimum:
        raise EnvError(f"environment variable {name}={v} must be >= {minimum}")
    return v


def env_float(name: str, env: Optional[Mapping[str, str]] = None, *, minimum: float = 0.0) -> Optional[float]:
    e = os.environ if env is None else env
    if name not in e:
        return None
    raw = e[name].strip()
    if not _NUMBER.fullmatch(raw):
        raise EnvError(
            f"environment variable {name}={e[name]!r} is not a number; "
            f"expected a decimal number >= {minimum} in plain ASCII (e.g. 1.5)"
        )
    v = float(raw)
    if not math.isfinite(v) or v < minimum:
        raise EnvError(f"environment variable {name}={raw} must be a finite number >= {minimum}")
    return v


def env_str(name: str, env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    e = os.environ if env is None else env
    v = e.get(name)
    if v is None:
        return None
    if not v.strip():
        raise EnvError(f"environment variable {name} is set but empty")
    return v.strip()


def o_direct_disabled(env: Optional[Mapping[str, str]] = None) -> Optional[bool]:
    """DYNBLOCK_DISABLE_O_DIRECT, else Dynamo's DYN_KVBM_DISK_DISABLE_O_DIRECT.

    Returns None when neither is set. When both are set, ours wins.
    """
    ours = env_bool("DYNBLOCK_DISABLE_O_DIRECT", env)
    theirs = env_bool("DYN_KVBM_DISK_DISABLE_O_DIRECT", env)
    return ours if ours is not None else theirs


def numa_disabled(env: Optional[Mapping[str, str]] = None) -> Optional[bool]:
    """DYNBLOCK_DISABLE_NUMA, else Dynamo's DYN_MEMORY_DISABLE_NUMA."""
    ours = env_bool("DYNBLOCK_DISABLE_NUMA", env)
    theirs = env_bool("DYN_MEMORY_DISABLE_NUMA", env)
    return ours if ours is not None else theirs
