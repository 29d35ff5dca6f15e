"""``python -m dynblock.bench``: throughput of the disk tier, side by side with
naive Python file I/O, in one run.

Default: 2 MiB blocks, random slot order, O_DIRECT on and off, in a temporary
directory; about 20 seconds. Every figure is the median of ``--repeat`` runs
with min and max; runs of dynblock and the baseline are interleaved so that
drift of a noisy machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np

from . import _core
from .disk import DiskStorage

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


@dataclass
class Case:
    """One measured case: its parameters and the throughput of each repeat."""

    workload: str
    impl: str
    op: str
    params: Dict[str, object]
    gib_s: List[float] = field(default_factory=list)
    ratios: Dict[str, float] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.gib_s) if self.gib_s else float("nan")

    def summary(self) -> dict:
        d = asdict(self)
        d["median_gib_s"] = self.median
        d["min_gib_s"] = min(self.gib_s) if self.gib_s else None
        d["max_gib_s"] = max(self.gib_s) if self.gib_s else None
        return d


def _timed(fn: Callable[[], None], nbytes: int) -> float:
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return nbytes / GiB / dt if dt > 0 else float("inf")


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled

    def step(self, label: str) -> None:
        self.done += 1
        if self.enabled:
            width = 30
            filled = int(width * self.done / max(self.total, 1))
            sys.stderr.write(
                f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {label:<40.40}"
            )
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 90 + "\r")
            sys.stderr.flush()


def _naive_python(path: str, order: np.ndarray, block_size: int, buf: np.ndarray):
    """Plain Python file I/O at the same block size and order."""
    mv = memoryview(buf)

    def write() -> None:
        with open(path, "r+b", buffering=0) as f:
            for i, slot in enumerate(order):
                f.seek(int(slot) * block_size)
                f.write(mv[i * block_size : (i + 1) * block_size])
            os.fsync(f.fileno())

    def read() -> None:
        with open(path, "rb", buffering=0) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            for i, slot in enumerate(order):
                f.seek(int(slot) * block_size)
                f.readinto(mv[i * block_size : (i + 1) * block_size])

    return write, read


def run_disk(
    directory: str,
    block_sizes: List[int],
    num_blocks: int,
    batch: int,
    io_depth: int,
    repeat: int,
    progress: _Progress,
    seed: int = 0,
) -> List[Case]:
    rng = np.random.default_rng(seed)
    cases: List[Case] = []
    for bs in block_sizes:
        n = max(1, num_blocks // max(1, bs // (2 << 20))) if bs > (2 << 20) else num_blocks
        nbytes = n * bs
        buf = rng.integers(0, 256, size=nbytes, dtype=np.uint8)
        order = rng.permutation(n).astype(np.uint64)
        params = dict(block_size=bs, blocks=n, pattern="random", batch=batch, io_depth=io_depth)

        stores = {
            "o_direct": DiskStorage(directory, n, bs, io_depth=io_depth),
            "buffered": DiskStorage(directory, n, bs, io_depth=io_depth, o_direct=False),
        }
        naive_path = os.path.join(directory, f".dynblock-bench-naive-{os.getpid()}")
        with open(naive_path, "wb") as f:
            f.truncate(nbytes)
        try:
            by_key: Dict[tuple, Case] = {}

            def case(impl: str, op: str, extra: Optional[dict] = None) -> Case:
                key = (impl, op)
                if key not in by_key:
                    p = dict(params)
                    p.update(extra or {})
                    by_key[key] = Case("disk", impl, op, p)
                    cases.append(by_key[key])
                return by_key[key]

            naive_w, naive_r = _naive_python(naive_path, order, bs, buf)
            out = np.empty_like(buf)
            for _ in range(repeat):
                for mode, s in stores.items():
                    def w(s: DiskStorage = s) -> None:
                        for i in range(0, n, batch):
                            s.write_blocks(order[i : i + batch], buf[i * bs : (i + batch) * bs])
                        s.sync()

                    def r(s: DiskStorage = s) -> None:
                        for i in range(0, n, batch):
                            s.read_blocks(order[i : i + batch], out[i * bs : (i + batch) * bs])

                    extra = {"o_direct": s.o_direct, "fallback_reason": s.fallback_reason}
                    case(f"dynblock-{mode}", "write", extra).gib_s.append(_timed(w, nbytes))
                    progress.step(f"dynblock {mode} write {bs >> 10} KiB")
                    s.drop_page_cache()
                    case(f"dynblock-{mode}", "read", extra).gib_s.append(_timed(r, nbytes))
                    progress.step(f"dynblock {mode} read {bs >> 10} KiB")
                    if not np.array_equal(out, buf):
                        raise RuntimeError(f"dynblock ({mode}) read back other bytes than it wrote")
                case("python-naive", "write").gib_s.append(_timed(naive_w, nbytes))
                progress.step(f"naive write {bs >> 10} KiB")
                case("python-naive", "read").gib_s.append(_timed(naive_r, nbytes))
                progress.step(f"naive read {bs >> 10} KiB")
            for op in ("write", "read"):
                base = by_key[("python-naive", op)].median
                for mode in stores:
                    c = by_key[(f"dynblock-{mode}", op)]
                    if base > 0:
                        c.ratios["vs_python_naive"] = c.median / base
        finally:
            for s in stores.values():
                s.close()
            os.unlink(naive_path)
    return cases


def machine_info(directory: str) -> dict:
    return {
        "python": platform.python_version(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "filesystem": _core.fs_type(directory),
        "directory": directory,
        "build": _core.build_profile(),
    }


def format_table(cases: List[Case]) -> str:
    rows = [("workload", "impl", "op", "block", "GiB/s (median)", "min..max", "ratios")]
    for c in cases:
        ratios = " ".join(f"{k}={v:.2f}x" for k, v in c.ratios.items())
        bs = int(c.params.get("block_size", 0))  # type: ignore[arg-type]
        rows.append(
            (
                c.workload,
                c.impl,
                c.op,
                f"{bs >> 10} KiB" if bs else "",
                f"{c.median:.2f}",
                f"{min(c.gib_s):.2f}..{max(c.gib_s):.2f}" if c.gib_s else "",
                ratios,
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dynblock.bench", description=__doc__.split("\n")[0])
    p.add_argument("--dir", help="directory for the test files (default: a new temporary directory)")
    p.add_argument(
        "--block-size",
        type=parse_size,
        action="append",
        help="block size, repeatable (default: 2MiB)",
    )
    p.add_argument("--blocks", type=int, default=128, help="blocks per case (default: 128)")
    p.add_argument("--batch", type=int, default=32, help="blocks per call (default: 32)")
    p.add_argument("--io-depth", type=int, default=16, help="I/Os in flight (default: 16)")
    p.add_argument("--repeat", type=int, default=3, help="runs per case (default: 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--out", help="also write the JSON object to this file")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("blocks", "batch", "io_depth", "repeat"):
        if getattr(args, name) < 1:
            build_parser().error(f"--{name.replace('_', '-')} must be >= 1")
    block_sizes = args.block_size or [2 << 20]
    tmp = None
    directory = args.dir
    if directory is None:
        tmp = tempfile.TemporaryDirectory(prefix="dynblock-bench-", dir=os.environ.get("TMPDIR"))
        directory = tmp.name
    elif not os.path.isdir(directory):
        build_parser().error(f"--dir {directory!r} is not a directory")
    try:
        steps = len(block_sizes) * args.repeat * 6
        progress = _Progress(steps, enabled=sys.stderr.isatty() and not args.json)
        t0 = time.perf_counter()
        cases = run_disk(
            directory, block_sizes, args.blocks, args.batch, args.io_depth, args.repeat, progress
        )
        progress.close()
        result = {
            "machine": machine_info(directory),
            "seconds": time.perf_counter() - t0,
            "cases": [c.summary() for c in cases],
        }
    finally:
        if tmp is not None:
            tmp.cleanup()
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.json:
        print(text)
    else:
        m = result["machine"]
        print(
            f"dynblock bench: {m['filesystem']} at {m['directory']}, kernel {m['kernel']}, "
            f"{m['cpus']} CPUs, {m['build']} build"
        )
        print(format_table(cases))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
