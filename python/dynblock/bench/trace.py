"""Replay of a KV reuse trace (Mooncake's JSONL format) through a BlockManager.

Each line: ``{"timestamp": ms, "input_length": n, "output_length": n,
"hash_ids": [...]}``; ``hash_ids`` are the request's prefix blocks in order
(512 tokens each). Each request ``match``es its ids, ``get``s the cached
prefix and ``put``s the rest, as a serving engine would.
"""

from __future__ import annotations

import gzip
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, List, Optional

import numpy as np

from ..buffers import aligned_empty

TOKENS_PER_BLOCK = 512
DEFAULT_TRACE = "mooncake_conversation"
#: Traces shipped with the package (``traces/<name>.jsonl.gz``): two real
#: request traces from Moonshot AI's Kimi service, published with the Mooncake
#: FAST'25 paper (repository kvcache-ai/Mooncake, ``FAST25-release/traces/``,
#: Apache License 2.0). See ``traces/README.md``.
SHIPPED_TRACES = ("mooncake_conversation", "mooncake_synthetic")
TRACE_DIR = Path(__file__).resolve().parent / "traces"


@dataclass(frozen=True)
class Request:
    timestamp: int
    input_length: int
    output_length: int
    hash_ids: List[int]


def parse_trace(lines: Iterable[str], source: str = "<trace>", limit: Optional[int] = None) -> List[Request]:
    """Parse JSONL trace lines; errors name the line."""
    out: List[Request] = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            ids = d["hash_ids"]
            if not isinstance(ids, list) or not all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**64 for x in ids
            ):
                raise ValueError("hash_ids must be a list of unsigned 64-bit integers")
            req = Request(int(d.get("timestamp", 0)), int(d.get("input_length", 0)),
                          int(d.get("output_length", 0)), ids)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{source}:{no}: not a trace record ({e}): {line.strip()[:80]!r}") from None
        out.append(req)
        if limit is not None and len(out) >= limit:
            break
    return out


def load_trace(path: str, limit: Optional[int] = None) -> List[Request]:
    """Read a JSONL trace, gzip-compressed when the name ends in ``.gz``."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return parse_trace(f, source=str(path), limit=limit)


def find_trace(name: str = DEFAULT_TRACE) -> Optional[str]:
    """The path of a trace given by file path or by the name of a shipped one
    (``mooncake_conversation``, ``mooncake_synthetic``; ``conversation`` and
    ``synthetic`` also work). ``$DYNBLOCK_TRACE_DIR`` is searched first, then
    the traces inside the package. None when nothing matches."""
    if os.path.isfile(name):
        return name
    stem = name
    for suffix in (".gz", ".jsonl"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    if not stem.startswith("mooncake_"):
        stem = "mooncake_" + stem
    dirs = []
    if os.environ.get("DYNBLOCK_TRACE_DIR"):
        dirs.append(Path(os.environ["DYNBLOCK_TRACE_DIR"]))
    dirs.append(TRACE_DIR)
    for d in dirs:
        for cand in (d / f"{stem}.jsonl", d / f"{stem}.jsonl.gz"):
            if cand.is_file():
                return str(cand)
    return None


@dataclass
class ReplayResult:
    requests: int
    block_refs: int
    hit_blocks: int
    host_hits: int
    disk_hits: int
    put_blocks: int
    tokens_saved: int
    payload_bytes: int
    seconds: float
    bytes_moved: int

    @property
    def hit_rate(self) -> float:
        return self.hit_blocks / self.block_refs if self.block_refs else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["hit_rate"] = self.hit_rate
        d["host_hit_rate"] = self.host_hits / self.block_refs if self.block_refs else 0.0
        d["disk_hit_rate"] = self.disk_hits / self.block_refs if self.block_refs else 0.0
        d["requests_per_s"] = self.requests / self.seconds if self.seconds else 0.0
        d["gib_s"] = self.bytes_moved / (1 << 30) / self.seconds if self.seconds else 0.0
        return d


def replay(manager, requests: List[Request], tokens_per_block: int = TOKENS_PER_BLOCK,
           namespace: Optional[str] = None,
           after: Optional[Callable[[Request], None]] = None) -> ReplayResult:
    """Run ``requests`` through ``manager`` (a dynblock.BlockManager), in
    ``namespace``; ``after(request)`` runs after each (another tenant's
    traffic, say)."""
    bs = manager.block_size
    longest = max((len(r.hash_ids) for r in requests), default=0)
    dst = aligned_empty(max(longest, 1) * bs)
    src = aligned_empty(max(longest, 1) * bs)
    src[:] = np.random.default_rng(0).integers(0, 256, size=src.size, dtype=np.uint8)
    before = manager.stats(namespace=namespace)
    refs = hits = puts = 0
    t0 = time.perf_counter()
    for r in requests:
        hs = np.asarray(r.hash_ids, dtype=np.uint64)
        refs += len(hs)
        n = manager.match(hs, namespace=namespace)
        if n:
            got = manager.get(hs[:n], dst[:n * bs], namespace=namespace)
            hits += got
            n = got
        if n < len(hs):
            manager.put(hs[n:], src[:(len(hs) - n) * bs], namespace=namespace)
            puts += len(hs) - n
        if after is not None:
            after(r)
    dt = time.perf_counter() - t0
    end = manager.stats(namespace=namespace)
    return ReplayResult(
        requests=len(requests),
        block_refs=refs,
        hit_blocks=hits,
        host_hits=end["host_hits"] - before["host_hits"],
        disk_hits=end["disk_hits"] - before["disk_hits"],
        put_blocks=puts,
        tokens_saved=hits * tokens_per_block,
        payload_bytes=bs,
        seconds=dt,
        bytes_moved=(hits + puts) * bs,
    )
