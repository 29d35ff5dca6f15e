"""Optional CUDA registration of host memory (``cudaHostRegister``).

Needs ``cuda-python`` and a visible GPU. Without them nothing is faked:
:func:`register_host_memory` returns ``(False, reason)``.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

#: One cudaHostRegister call is capped (vLLM saw failures above 512 GiB);
#: register in chunks of at most this many bytes.
MAX_REGISTER_CHUNK = 256 << 30


def _runtime() -> Tuple[Optional[Any], str]:
    try:
        from cuda.bindings import runtime  # type: ignore[import-not-found]  # cuda-python >= 12.6
        return runtime, ""
    except ImportError:
        pass
    try:
        from cuda import cudart  # type: ignore[import-not-found]  # older cuda-python
        return cudart, ""
    except ImportError:
        return None, "cuda-python is not installed (pip install 'dynblock[gpu]')"


def gpu_available() -> Tuple[bool, str]:
    rt, why = _runtime()
    if rt is None:
        return False, why
    err, count = rt.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        return False, f"no CUDA device is visible (cudaGetDeviceCount: {err}, count {count})"
    return True, f"{count} CUDA device(s)"


def chunks(ptr: int, nbytes: int, limit: int = MAX_REGISTER_CHUNK) -> List[Tuple[int, int]]:
    """Split ``[ptr, ptr + nbytes)`` into registrable pieces of at most ``limit``."""
    out = []
    off = 0
    while off < nbytes:
        n = min(limit, nbytes - off)
        out.append((ptr + off, n))
        off += n
    return out


def register_host_memory(ptr: int, nbytes: int) -> Tuple[bool, str]:
    """Register ``[ptr, ptr + nbytes)`` for DMA. Returns (registered, reason)."""
    ok, why = gpu_available()
    if not ok:
        return False, why
    rt, _ = _runtime()
    assert rt is not None
    done: List[int] = []
    for p, n in chunks(ptr, nbytes):
        (err,) = rt.cudaHostRegister(p, n, 0)
        if int(err) != 0:
            for q in done:
                rt.cudaHostUnregister(q)
            return False, f"cudaHostRegister({n} bytes) failed: {err}"
        done.append(p)
    return True, f"registered in {len(done)} chunk(s)"


def unregister_host_memory(ptr: int, nbytes: int) -> None:
    rt, _ = _runtime()
    if rt is None:
        return
    for p, _n in chunks(ptr, nbytes):
        rt.cudaHostUnregister(p)
