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
from typing import Any, Dict, List, Mapping, Optional, Tuple

from . import _core

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


#: Every environment variable dynblock reads, from the engine's one table
#: (``rust/settings.rs``, ``ENV``): groups of ``(tiers, [(var, field, form,
#: choices, meaning), ...])``. In a group the first variable set decides;
#: later groups override earlier ones of the same field.
TABLE: List[Tuple[bool, List[Tuple[str, str, str, List[str], str]]]] = _core.settings_env()

#: What a ``disables`` switch sets its field to when true.
OFF: Dict[str, Any] = {"o_direct": False, "numa_node": None}

_UNCHANGED = object()


def _parse(var: str, field: str, form: str, choices: List[str], env: Mapping[str, str]) -> Any:
    """The value ``var`` gives ``field`` (``_UNCHANGED`` for a switch set to false)."""
    if form == "int":
        return env_int(var, env)
    if form == "int_or_auto":
        return "auto" if env[var].strip().lower() == "auto" else env_int(var, env)
    if form == "bool":
        return env_bool(var, env)
    if form == "str":
        return env_str(var, env)
    if form == "choice":
        v = (env_str(var, env) or "").lower()
        if v not in choices:
            shown = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"
            raise EnvError(f"environment variable {var}={env[var]!r} must be {shown}")
        return v
    if form == "decimal_gb":
        gb = env_float(var, env)
        return None if gb is None else int(gb * 10**9)
    if form == "disables":
        return OFF[field] if env_bool(var, env) else _UNCHANGED
    if form == "zero_fill":
        return "auto" if env_bool(var, env) else "sparse-fallback"
    if form == "seconds_or_none":
        return env_int(var, env) or None
    raise AssertionError(f"unknown form {form!r} of {var}")


def read_table(env: Optional[Mapping[str, str]] = None, *, tiers_only: bool = False
               ) -> Dict[str, Tuple[str, Any]]:
    """field -> (the variable that decided it, its value), from ``env``
    (``os.environ`` by default) and :data:`TABLE`. Every variable set is parsed,
    so a bad value is refused even where another one wins. ``tiers_only``: only
    the switches the standalone tier classes honour."""
    e = os.environ if env is None else env
    out: Dict[str, Tuple[str, Any]] = {}
    for tiers, group in TABLE:
        if tiers_only and not tiers:
            continue
        decided = False
        for var, field, form, choices, _ in group:
            if var not in e:
                continue
            value = _parse(var, field, form, choices, e)
            if not decided:
                decided = True
                if value is not _UNCHANGED:
                    out[field] = (var, value)
    return out


def table_rst() -> str:
    """The environment table of :data:`TABLE` as reStructuredText (the docs of
    ``dynblock.config``)."""
    rows = [(f"``{var}``", meaning) for _, group in TABLE for var, _, _, _, meaning in group]
    w = max(len(r[0]) for r in rows) + 2
    m = max(len(r[1]) for r in rows)
    rule = "=" * (w - 2) + "  " + "=" * m
    lines = [rule, "variable".ljust(w) + "meaning", rule]
    lines += [var.ljust(w) + meaning for var, meaning in rows]
    lines.append(rule)
    return "\n".join(lines)
