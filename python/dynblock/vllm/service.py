"""The lookup service: how vLLM's scheduler asks the worker that owns a store
how much of a request's prefix it holds, and keeps those blocks leased until
the worker loads them.

vLLM runs its scheduler and its workers in different processes (on the CPU
build even with one worker), and a dynblock store lives in one process: the
worker's. The worker serves lookups on a Unix socket
(:func:`dynblock.vllm.keys.socket_path`); the scheduler connects to it. Both
ends check that the peer runs as the same user (``SO_PEERCRED``). Frames are
length-prefixed binary (no pickle: nothing a peer sends is executed) and
checked before anything is allocated for them.

Time: a scheduler call waits at most ``timeout`` seconds and sends that budget
with the lookup; the worker bounds its remote work by it, and a lookup that
finishes too late for the scheduler to read its answer releases its leases at
once instead of keeping blocks pinned. A lookup the scheduler gave up on is
also released by the scheduler's next call. A dead, slow or missing worker is
"no hit", never a hang, and is retried at most once a second.

Connections: at most :attr:`LookupServer.MAX_CONNS` at once, each dropped when
its peer goes or stays idle for :attr:`LookupServer.IDLE_S`; a connection whose
thread cannot be started is closed and the service keeps accepting.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from typing import Callable, List, Optional, Sequence, Set

from .._once import LogOnce

log = logging.getLogger("dynblock.vllm")

OP_LOOKUP, OP_RELEASE, OP_PING = 1, 2, 3
#: Hashes one lookup may carry (a request of 65536 blocks of 16+ tokens: over a million tokens).
MAX_HASHES = 1 << 16
#: Bytes of one block hash at most (vLLM's are 32).
MAX_HASH_BYTES = 64
#: Bytes of a namespace (the request's ``cache_salt``) at most, as the store allows.
MAX_NAMESPACE_BYTES = 1024
_MAX_FRAME = 3 + 0xFFFF + 10 + MAX_HASHES * MAX_HASH_BYTES + 2 + MAX_NAMESPACE_BYTES
_HDR = struct.Struct("<I")
_LOOKUP = struct.Struct("<IHI")  # hash count, hash length, the caller's budget in ms
_CRED = struct.Struct("3i")  # pid, uid, gid


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket."""
    _, uid, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return uid


def shown(path: str) -> str:
    """A socket path for messages (an abstract name starts with '@')."""
    return "@" + path[1:] if path.startswith("\0") else path


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


def _rid(req_id: str) -> bytes:
    rid = req_id.encode()
    if len(rid) > 0xFFFF:
        raise ValueError(f"request id of {len(rid)} bytes is over 65535")
    return rid


def encode_lookup(req_id: str, hashes: Sequence[bytes], budget_s: float = 0.05,
                  namespace: Optional[str] = None) -> bytes:
    """A LOOKUP frame: the request, its block hashes (1 to 64 bytes each, all
    the same length, at most :data:`MAX_HASHES`), how long the caller waits,
    and the namespace its blocks are in (None: the shared one; else 1 to
    :data:`MAX_NAMESPACE_BYTES` bytes of UTF-8)."""
    rid = _rid(req_id)
    ns = b"" if namespace is None else namespace.encode()
    if namespace is not None and not 1 <= len(ns) <= MAX_NAMESPACE_BYTES:
        raise ValueError(f"a namespace is 1 to {MAX_NAMESPACE_BYTES} bytes, got {len(ns)}")
    hlen = len(hashes[0]) if hashes else 0
    if any(len(h) != hlen for h in hashes):
        raise ValueError("block hashes of one request must all have the same length")
    if hashes and not 1 <= hlen <= MAX_HASH_BYTES:
        raise ValueError(f"block hashes must be 1 to {MAX_HASH_BYTES} bytes, got {hlen}")
    if len(hashes) > MAX_HASHES:
        raise ValueError(f"a lookup carries at most {MAX_HASHES} hashes, got {len(hashes)}")
    budget_ms = min(max(int(budget_s * 1000), 1), 0xFFFFFFFF)
    return (struct.pack("<BH", OP_LOOKUP, len(rid)) + rid
            + _LOOKUP.pack(len(hashes), hlen, budget_ms) + b"".join(hashes)
            + struct.pack("<H", len(ns)) + ns)


def encode_release(req_id: str) -> bytes:
    rid = _rid(req_id)
    return struct.pack("<BH", OP_RELEASE, len(rid)) + rid


def decode_request(body: bytes) -> "tuple[int, str, list[bytes], float, Optional[str]]":
    """(op, request id, hashes, the caller's budget in seconds, namespace);
    every count is checked against the frame's length before anything is
    built."""
    if len(body) < 3:
        raise ValueError("lookup frame shorter than its header")
    op, rlen = struct.unpack_from("<BH", body, 0)
    pos = 3
    if len(body) < pos + rlen:
        raise ValueError("lookup frame shorter than its request id")
    req_id = body[pos:pos + rlen].decode()
    pos += rlen
    hashes: list[bytes] = []
    budget = 0.0
    namespace: Optional[str] = None
    if op == OP_LOOKUP:
        if len(body) < pos + _LOOKUP.size:
            raise ValueError("lookup frame shorter than its counts")
        n, hlen, budget_ms = _LOOKUP.unpack_from(body, pos)
        pos += _LOOKUP.size
        if n > MAX_HASHES:
            raise ValueError(f"lookup frame with {n} hashes (at most {MAX_HASHES})")
        if n and not 1 <= hlen <= MAX_HASH_BYTES:
            raise ValueError(f"lookup frame with hashes of {hlen} bytes (1 to {MAX_HASH_BYTES})")
        end = pos + n * hlen
        if len(body) < end + 2:
            raise ValueError("lookup frame shorter than its hashes and namespace length")
        (nslen,) = struct.unpack_from("<H", body, end)
        if nslen > MAX_NAMESPACE_BYTES or len(body) != end + 2 + nslen:
            raise ValueError("lookup frame length does not match its hash count and namespace")
        hashes = [body[pos + i * hlen: pos + (i + 1) * hlen] for i in range(n)]
        budget = budget_ms / 1000.0
        if nslen:
            namespace = body[end + 2:end + 2 + nslen].decode()
    elif op == OP_RELEASE or op == OP_PING:
        if len(body) != pos:
            raise ValueError("release/ping frame longer than its request id")
    else:
        raise ValueError(f"unknown lookup-service op {op}")
    return op, req_id, hashes, budget, namespace


class LookupServer:
    """Serves ``lookup(req_id, hashes, timeout) -> count`` (with
    ``namespace=`` when the request has one) and
    ``release(req_id)`` on a Unix socket, one thread per connection (at most
    :attr:`MAX_CONNS`), to processes of this user only. ``close()`` stops it
    and removes the socket."""

    #: Connections served at once; more are closed at once (the peer sees "no hit").
    MAX_CONNS = 32
    #: A connection that sends nothing for this long is closed (the client reconnects).
    IDLE_S = 300.0
    #: Once a frame has begun, the rest of it must arrive within this.
    FRAME_S = 5.0
    #: Share of the caller's budget the lookup itself may use (the rest: the answer's way back).
    BUDGET_SHARE = 0.8

    def __init__(self, path: str, lookup: Callable[..., int],
                 release: Callable[[str], bool]) -> None:
        self.path = path
        self._lookup, self._release = lookup, release
        self._closed = threading.Event()
        self._uid = os.geteuid()
        self.late = 0  # lookups released because they finished after the caller gave up
        self.refused = 0  # connections refused (other user, over MAX_CONNS, no thread)
        abstract = path.startswith("\0")
        if not abstract and os.path.exists(path):
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
        except OSError as e:
            self._sock.close()
            raise RuntimeError(f"cannot serve lookups at {shown(path)}: {e}") from None
        finally:
            os.umask(old)
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self._conns: Set[socket.socket] = set()
        self._lock = threading.Lock()
        self._once = LogOnce(log)
        self._thread = threading.Thread(target=self._accept, name="dynblock-lookup", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._closed.is_set():
                    return
                time.sleep(0.05)  # e.g. EMFILE: keep serving the connections there are
                continue
            try:
                self._admit(conn)
            except Exception as e:  # never let one connection end the service
                self.refused += 1
                conn.close()
                self._once("admit", "dynblock lookup service: a connection failed to start "
                           "(%s: %s); the service goes on (logged once)", type(e).__name__, e)

    def _admit(self, conn: socket.socket) -> None:
        uid = peer_uid(conn)
        if uid != self._uid:
            self.refused += 1
            conn.close()
            self._once("uid", "dynblock lookup service: refused a connection from uid %d (it "
                       "serves uid %d only; logged once)", uid, self._uid)
            return
        with self._lock:
            if len(self._conns) >= self.MAX_CONNS:
                self.refused += 1
                conn.close()
                self._once("max", "dynblock lookup service: %d connections at once; refusing "
                           "more (logged once)", self.MAX_CONNS)
                return
            self._conns.add(conn)
        t = threading.Thread(target=self._serve, args=(conn,), name="dynblock-lookup-conn",
                             daemon=True)
        try:
            t.start()
        except RuntimeError:
            self._drop(conn)
            raise

    def _drop(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.discard(conn)
        conn.close()

    def _frame(self, conn: socket.socket) -> bytes:
        conn.settimeout(self.IDLE_S)
        head = _recv_exact(conn, 4)
        conn.settimeout(self.FRAME_S)
        (n,) = _HDR.unpack(head)
        if n > _MAX_FRAME:
            raise ConnectionError(f"frame of {n} bytes is over the {_MAX_FRAME} limit")
        return _recv_exact(conn, n)

    def _serve(self, conn: socket.socket) -> None:
        try:
            while not self._closed.is_set():
                try:
                    body = self._frame(conn)
                except (ConnectionError, OSError):
                    return  # gone, idle, or a bad frame: this connection ends
                start = time.monotonic()
                req_id, leased = "", False
                try:
                    op, req_id, hashes, budget, namespace = decode_request(body)
                    if op == OP_LOOKUP:
                        kw = {} if namespace is None else {"namespace": namespace}
                        result = self._lookup(req_id, hashes, timeout=budget * self.BUDGET_SHARE, **kw)
                        leased = result > 0
                        if leased and time.monotonic() - start > budget:
                            # The caller has stopped waiting: nobody will load or release it.
                            self._release(req_id)
                            self.late += 1
                            result, leased = 0, False
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
                    if leased:  # the answer cannot arrive: the lease must not stay
                        self._release(req_id)
                    return
        finally:
            self._drop(conn)

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=2)
        if not self.path.startswith("\0"):
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

    #: Abandoned lookups remembered for release at most (older ones expire on the worker).
    MAX_ABANDONED = 1024

    def __init__(self, path: str, timeout: float = 0.05, retry_s: float = 1.0) -> None:
        self.path, self.timeout, self.retry_s = path, timeout, retry_s
        self._sock: Optional[socket.socket] = None
        self._next_try = 0.0
        self._up: Optional[bool] = None
        self._lock = threading.Lock()
        self.errors = 0
        # Requests whose lookup was given up on: released by the next call.
        self._abandoned: List[str] = []

    def _state(self, up: bool, why: str = "") -> None:
        if up != self._up:
            if up:
                log.info("dynblock: lookup service at %s reachable", shown(self.path))
            elif self._up is not None:  # quiet until it was up once: workers start late
                log.warning("dynblock: lookup service at %s unreachable (%s): no hits until it "
                            "answers", shown(self.path), why)
            self._up = up

    def _connect(self, now: float) -> Optional[socket.socket]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
            uid = peer_uid(s)
            if uid != os.geteuid():
                raise PermissionError(f"the socket is served by uid {uid}, not this user "
                                      f"({os.geteuid()})")
        except OSError as e:
            s.close()
            self._next_try = now + self.retry_s
            self._state(False, f"{type(e).__name__}: {e}")
            return None
        return s

    def _stale(self, s: socket.socket) -> bool:
        """Whether the service closed this idle connection (it would read as a failure)."""
        try:
            s.setblocking(False)
            try:
                return s.recv(1, socket.MSG_PEEK) == b""
            except BlockingIOError:
                return False
            finally:
                s.settimeout(self.timeout)
        except OSError:
            return True

    def _exchange(self, body: bytes) -> int:
        assert self._sock is not None
        _send_frame(self._sock, body)
        (result,) = struct.unpack("<I", _recv_frame(self._sock))
        return int(result)

    def _call(self, body: bytes, req_id: str = "") -> int:
        with self._lock:
            now = time.monotonic()
            if self._sock is not None and self._stale(self._sock):
                self._sock.close()
                self._sock = None
            if self._sock is None:
                if now < self._next_try:
                    if req_id:
                        self._abandon(req_id)
                    return 0
                self._sock = self._connect(now)
                if self._sock is None:
                    return 0
            try:
                while self._abandoned:  # lookups given up on earlier: their leases go now
                    self._exchange(encode_release(self._abandoned[0]))
                    self._abandoned.pop(0)
                result = self._exchange(body)
            except (OSError, ConnectionError, struct.error) as e:
                # A late answer must not be read as the next call's: drop the connection,
                # and have the worker release what this lookup may still lease.
                self._sock.close()
                self._sock = None
                self._next_try = now + self.retry_s
                self.errors += 1
                if req_id:
                    self._abandon(req_id)
                self._state(False, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
                return 0
            self._state(True)
            return result

    def _abandon(self, req_id: str) -> None:
        if req_id not in self._abandoned:
            self._abandoned.append(req_id)
            del self._abandoned[:-self.MAX_ABANDONED]

    def lookup(self, req_id: str, hashes: Sequence[bytes], namespace: Optional[str] = None) -> int:
        """How many leading blocks of ``hashes`` (in ``namespace``) the worker
        holds, leased for ``req_id`` (replacing that request's earlier lease)."""
        if not hashes:
            return 0
        return self._call(encode_lookup(req_id, hashes, self.timeout, namespace), req_id)

    def release(self, req_id: str) -> None:
        self._call(encode_release(req_id), req_id)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
