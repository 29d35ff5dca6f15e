"""The lookup service: how vLLM's scheduler asks the worker that owns a store
how much of a request's prefix it holds, and keeps those blocks leased until
the worker loads them.

vLLM runs its scheduler and its workers in different processes (on the CPU
build even with one worker), and a dynblock store lives in one process: the
worker's. The worker serves lookups on a Unix socket in a private directory
(:func:`dynblock.vllm.keys.socket_path`); the scheduler connects to it. Frames
are length-prefixed binary (no pickle: nothing a peer sends is executed). A
scheduler call waits at most ``timeout`` seconds; a dead, slow or missing
worker is "no hit", never a hang, and is retried at most once a second.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from typing import Callable, Optional, Sequence

log = logging.getLogger("dynblock.vllm")

OP_LOOKUP, OP_RELEASE, OP_PING = 1, 2, 3
_MAX_FRAME = 64 << 20
_HDR = struct.Struct("<I")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return bytes(buf)


def _recv_frame(sock: socket.socket) -> bytes:
    (n,) = _HDR.unpack(_recv_exact(sock, 4))
    if n > _MAX_FRAME:
        raise ConnectionError(f"frame of {n} bytes is over the {_MAX_FRAME} limit")
    return _recv_exact(sock, n)


def _send_frame(sock: socket.socket, body: bytes) -> None:
    sock.sendall(_HDR.pack(len(body)) + body)


def encode_lookup(req_id: str, hashes: Sequence[bytes]) -> bytes:
    rid = req_id.encode()
    hlen = len(hashes[0]) if hashes else 0
    if any(len(h) != hlen for h in hashes):
        raise ValueError("block hashes of one request must all have the same length")
    return (struct.pack("<BH", OP_LOOKUP, len(rid)) + rid
            + struct.pack("<IH", len(hashes), hlen) + b"".join(hashes))


def decode_request(body: bytes) -> "tuple[int, str, list[bytes]]":
    op, rlen = struct.unpack_from("<BH", body, 0)
    pos = 3
    req_id = body[pos:pos + rlen].decode()
    pos += rlen
    hashes: list[bytes] = []
    if op == OP_LOOKUP:
        n, hlen = struct.unpack_from("<IH", body, pos)
        pos += 6
        if len(body) != pos + n * hlen:
            raise ValueError("lookup frame length does not match its hash count")
        hashes = [body[pos + i * hlen: pos + (i + 1) * hlen] for i in range(n)]
    elif op not in (OP_RELEASE, OP_PING):
        raise ValueError(f"unknown lookup-service op {op}")
    return op, req_id, hashes


class LookupServer:
    """Serves ``lookup(req_id, hashes) -> count`` and ``release(req_id)`` on a
    Unix socket, one thread per connection. ``close()`` stops it and removes
    the socket."""

    def __init__(self, path: str, lookup: Callable[[str, list], int],
                 release: Callable[[str], bool]) -> None:
        self.path = path
        self._lookup, self._release = lookup, release
        self._closed = threading.Event()
        if os.path.exists(path):
            # A live service answers; a stale socket file from a dead one is replaced.
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(0.5)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)
            else:
                raise RuntimeError(f"another process already serves lookups at {path}")
            finally:
                probe.close()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            self._sock.bind(path)
        finally:
            os.umask(old)
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self._conns: list = []
        self._thread = threading.Thread(target=self._accept, name="dynblock-lookup", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), name="dynblock-lookup-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(None)
        try:
            while not self._closed.is_set():
                try:
                    body = _recv_frame(conn)
                except (ConnectionError, OSError):
                    return
                try:
                    op, req_id, hashes = decode_request(body)
                    if op == OP_LOOKUP:
                        result = self._lookup(req_id, hashes)
                    elif op == OP_RELEASE:
                        result = int(self._release(req_id))
                    else:
                        result = 0
                except Exception as e:  # a bad frame or a failed lookup is "no hit"
                    log.warning("dynblock lookup service: %s: %s", type(e).__name__, e)
                    result = 0
                try:
                    _send_frame(conn, struct.pack("<I", result))
                except OSError:
                    return
        finally:
            conn.close()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._sock.close()
        for c in self._conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=2)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class LookupClient:
    """The scheduler's end: one connection, reopened when needed. Every call
    returns within about ``timeout`` seconds; when the service cannot be
    reached or answers late the call returns 0 (no hit), the connection is
    dropped, and reconnecting is tried at most once per ``retry_s``. One log
    line per change between reachable and not."""

    def __init__(self, path: str, timeout: float = 0.05, retry_s: float = 1.0) -> None:
        self.path, self.timeout, self.retry_s = path, timeout, retry_s
        self._sock: Optional[socket.socket] = None
        self._next_try = 0.0
        self._up: Optional[bool] = None
        self._lock = threading.Lock()
        self.errors = 0

    def _state(self, up: bool, why: str = "") -> None:
        if up != self._up:
            if up:
                log.info("dynblock: lookup service at %s reachable", self.path)
            elif self._up is not None:  # quiet until it was up once: workers start late
                log.warning("dynblock: lookup service at %s unreachable (%s): no hits until it "
                            "answers", self.path, why)
            self._up = up

    def _call(self, body: bytes) -> int:
        with self._lock:
            now = time.monotonic()
            if self._sock is None:
                if now < self._next_try:
                    return 0
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(self.timeout)
                try:
                    s.connect(self.path)
                except OSError as e:
                    s.close()
                    self._next_try = now + self.retry_s
                    self._state(False, f"{type(e).__name__}: {e}")
                    return 0
                self._sock = s
            try:
                _send_frame(self._sock, body)
                (result,) = struct.unpack("<I", _recv_frame(self._sock))
            except (OSError, ConnectionError, struct.error) as e:
                # A late answer must not be read as the next call's: drop the connection.
                self._sock.close()
                self._sock = None
                self._next_try = now + self.retry_s
                self.errors += 1
                self._state(False, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
                return 0
            self._state(True)
            return int(result)

    def lookup(self, req_id: str, hashes: Sequence[bytes]) -> int:
        """How many leading blocks of ``hashes`` the worker holds, leased for
        ``req_id`` (replacing that request's earlier lease)."""
        if not hashes:
            return 0
        return self._call(encode_lookup(req_id, hashes))

    def release(self, req_id: str) -> None:
        rid = req_id.encode()
        self._call(struct.pack("<BH", OP_RELEASE, len(rid)) + rid)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
