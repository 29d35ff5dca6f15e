"""How vLLM's block hashes become dynblock keys, and where a store's lookup
service listens. Pure Python: importable without vLLM."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tempfile
from typing import Sequence


log = logging.getLogger("dynblock.vllm")

def block_key(block_hash: bytes, layer: int, fingerprint: int) -> int:
    """The dynblock key of one layer of one vLLM block.

    ``block_hash`` is vLLM's own hash of the block (``request.block_hashes[i]``:
    chained, so it names the whole prefix up to and including the block);
    ``layer`` the layer's index in the model; ``fingerprint`` the store's layout
    fingerprint (model depth, block size in tokens, KV heads x head size,
    dtype). The key is the first 8 bytes of BLAKE2b over the three, as a
    little-endian integer: two models, dtypes or block sizes never share
    keys, and all layers of a block have unrelated keys.

    What a collision costs: two different (block, layer) pairs with one key
    would serve one's KV for the other's prefix. With 64-bit keys the chance
    that any two of N stored blocks collide is about N**2 / 2**65 (3e-6 for
    ten million stored blocks)."""
    if not isinstance(block_hash, (bytes, bytearray)):
        raise TypeError(f"block_hash must be bytes (vLLM's block hash), got {type(block_hash).__name__}")
    if not 0 <= layer < 2**32:
        raise ValueError(f"layer must be in 0..2**32, got {layer}")
    h = hashlib.blake2b(digest_size=8)
    h.update(bytes(block_hash))
    h.update(layer.to_bytes(4, "little"))
    h.update((fingerprint % 2**64).to_bytes(8, "little"))
    return int.from_bytes(h.digest(), "little")


def layer_keys(block_hashes: Sequence[bytes], layer: int, fingerprint: int) -> list[int]:
    """:func:`block_key` of each hash, for one layer."""
    return [block_key(b, layer, fingerprint) for b in block_hashes]


def runtime_dir() -> str:
    """The private directory lookup sockets live in: ``$XDG_RUNTIME_DIR/dynblock``
    when that is set, else ``<tmp>/dynblock-<uid>``; created 0700 and refused when
    another user owns it or others may write it."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = os.path.join(base, "dynblock") if base else os.path.join(
        tempfile.gettempdir(), f"dynblock-{os.geteuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise PermissionError(
            f"{path} must be a directory owned by uid {os.geteuid()} that only its owner may "
            f"write (it is uid {st.st_uid}, mode {oct(st.st_mode & 0o7777)}); remove it or set "
            "XDG_RUNTIME_DIR to a private directory")
    return path


def socket_path(identity: str, rank: int = 0) -> str:
    """The Unix socket of the lookup service of one worker (``rank``) of one
    engine (``identity``: vLLM's ``instance_id``, which every process of an
    engine shares). Both the scheduler and the worker derive it, so no
    address travels between them; its name is a digest because socket paths
    are limited to 107 bytes.

    When :func:`runtime_dir` is refused (another user created
    ``<tmp>/dynblock-<uid>`` first, which anyone can do without
    ``XDG_RUNTIME_DIR``), the socket is an abstract one (Linux: a name in no
    directory, ``"\\0dynblock-<uid>-lookup-<digest>"``), so a squatted
    directory never stops an engine from starting. Nobody can be kept out of
    an abstract name by permissions, so both ends check that the other runs
    as this user (``SO_PEERCRED``; see :mod:`dynblock.vllm.service`)."""
    digest = hashlib.blake2b(f"{identity}/{rank}".encode(), digest_size=10).hexdigest()
    try:
        return os.path.join(runtime_dir(), f"lookup-{digest}.sock")
    except OSError as e:
        if not _fallback_said:
            _fallback_said.append(True)
            log.warning("dynblock: %s; lookups use an abstract socket instead", e)
        return f"\0dynblock-{os.geteuid()}-lookup-{digest}"


_fallback_said: list = []
