"""Shared pieces of the bench: sizes, measured cases, timing, progress."""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from .. import _core

GiB = float(1 << 30)


def parse_size(text: str) -> int:
    """'2MiB', '256k', '4096' -> bytes."""
    t = text.strip().lower().replace("ib", "").replace("b", "")
    mult = 1
    for suffix, m in (("k", 1 << 10), ("m", 1 << 20), ("g", 1 << 30)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
            break
    try:
        v = int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64KiB, 2MiB, 4096)") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return v


def size_label(n: int) -> str:
    for unit, m in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= m and n % m == 0:
            return f"{n // m} {unit}"
    return f"{n} B"


@dataclass
class Case:
    """One measured case: what ran, with which parameters, each repeat's value."""

    workload: str
    impl: str
    op: str
    params: Dict[str, Any]
    unit: str = "GiB/s"
    values: List[float] = field(default_factory=list)
    ratios: Dict[str, float] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)
    #: CPU seconds per GiB moved, one per repeat that measured it (see :func:`timed`).
    cpu: List[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def paired_ratio(self, other: "Case") -> float:
        """The median of ``self.values[i] / other.values[i]``: for two cases
        timed in turns (value ``i`` of each from the same round), so that a
        slow stretch of the machine falls on both sides of each ratio."""
        return statistics.median(a / b for a, b in zip(self.values, other.values))

    @property
    def cpu_s_per_gib(self) -> Optional[float]:
        """Median CPU seconds per GiB (all threads of the process, and child
        processes such as fio), or None when not measured."""
        return statistics.median(self.cpu) if self.cpu else None

    def add_rate(self, nbytes: int, t: float) -> None:
        """One repeat: ``nbytes`` moved in ``t`` seconds (GiB/s), and when
        ``t`` came from :func:`timed`, the CPU seconds per GiB it spent."""
        self.values.append(gib_s(nbytes, t))
        if isinstance(t, Timing) and nbytes > 0:
            self.cpu.append(t.cpu / (nbytes / GiB))

    def summary(self) -> Dict[str, Any]:
        return {
            "workload": self.workload,
            "impl": self.impl,
            "op": self.op,
            "params": self.params,
            "unit": self.unit,
            "values": self.values,
            "median": self.median,
            "min": min(self.values) if self.values else None,
            "max": max(self.values) if self.values else None,
            "ratios": self.ratios,
            **({"cpu_s_per_gib": self.cpu_s_per_gib, "cpu_values": self.cpu} if self.cpu else {}),
            **({"extra": self.extra} if self.extra else {}),
        }


class Results:
    """Cases keyed by (workload, impl, op, frozen params)."""

    def __init__(self) -> None:
        self.cases: List[Case] = []
        self._by: Dict[tuple, Case] = {}
        self.notes: List[str] = []

    def case(self, workload: str, impl: str, op: str, unit: str = "GiB/s", **params: Any) -> Case:
        key = (workload, impl, op, tuple(sorted(params.items())))
        c = self._by.get(key)
        if c is None:
            c = Case(workload, impl, op, dict(params), unit)
            self._by[key] = c
            self.cases.append(c)
        return c

    def find(self, workload: str, impl: str, op: str, **params: Any) -> Optional[Case]:
        return self._by.get((workload, impl, op, tuple(sorted(params.items()))))

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


class Timing(float):
    """Wall seconds of a timed call (a float), with ``cpu``: the CPU seconds
    the process spent meanwhile (user + system, every thread, plus child
    processes that ended in that time)."""

    cpu: float = 0.0


def cpu_seconds() -> float:
    """CPU seconds used so far by this process (all threads) and its waited-for children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed_call(fn: Callable[..., Any], *args: Any) -> "tuple[Any, Timing]":
    """``fn(*args)``'s result and its :class:`Timing`."""
    out: List[Any] = []
    t = timed(lambda: out.append(fn(*args)))
    return out[0], t


def timed(fn: Callable[[], Any]) -> Timing:
    c0 = cpu_seconds()
    t0 = time.perf_counter()
    fn()
    t = Timing(time.perf_counter() - t0)
    t.cpu = cpu_seconds() - c0
    return t


def gib_s(nbytes: int, seconds: float) -> float:
    return nbytes / GiB / seconds if seconds > 0 else float("inf")


class Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.total = 0
        self.done = 0

    def add(self, n: int) -> None:
        self.total += n

    def step(self, label: str) -> None:
        self.done += 1
        if self.enabled:
            width = 28
            filled = int(width * self.done / max(self.total, 1))
            sys.stderr.write(
                f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {label:<44.44}"
            )
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 90 + "\r")
            sys.stderr.flush()


def machine_info(directory: str) -> Dict[str, Any]:
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        model = ""
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = None
    return {
        "python": platform.python_version(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu": model,
        "cpus": len(os.sched_getaffinity(0)),
        "memory_bytes": mem,
        "filesystem": _core.fs_type(directory),
        "directory": directory,
        "build": _core.build_profile(),
    }


def find_python(explicit: Optional[str], env_var: str, module: str, build: str
                ) -> "tuple[Optional[str], str]":
    """The first interpreter that imports ``module`` among ``explicit``,
    ``$env_var``, ``.venv-vllm/bin/python`` and this one; or (None, why not,
    with ``build``: how to make one)."""
    import subprocess

    tried: List[str] = []
    for c in (explicit, os.environ.get(env_var), os.path.join(".venv-vllm", "bin", "python"),
              sys.executable):
        if not c or c in tried:
            continue
        tried.append(c)
        if not os.path.exists(c):
            continue
        r = subprocess.run([c, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
        if r.returncode == 0:
            return c, ""
    return None, f"no interpreter that imports {module} (tried {', '.join(tried)}): {build}"


def run_module(python: str, module: str, args: Dict[str, Any], what: str, timeout: float) -> Any:
    """``python -m module JSON(args)`` in a temporary directory of its own
    (engines leave sockets there); returns the JSON of its last ``RESULT``
    line, or raises ``RuntimeError`` naming ``what`` with the end of its output."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dynblock-engine-") as tmp:
        r = subprocess.run([python, "-m", module, json.dumps(args)], capture_output=True,
                           text=True, timeout=timeout, env={**os.environ, "TMPDIR": tmp})
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed (rc {r.returncode}): {(r.stdout + r.stderr)[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def drop_caches() -> bool:
    """Write back and drop the page cache (cold reads); False when not
    allowed (not root)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def run_engine_workload(res: "Results", progress: "Progress", python: Optional[str], why: str,
                        workload: str, module: str, args: Dict[str, Any]) -> Optional[Any]:
    """Run a workload's measuring module in an engine's interpreter
    (:func:`run_module`), passing its notes on; None (noted) without one."""
    if python is None:
        res.note(f"{workload} workload skipped: {why}")
        return None
    progress.add(1)
    out = run_module(python, module, args, f"the {workload} workload", 3600)
    for text in out["notes"]:
        res.note(text)
    progress.step(workload)
    return out
