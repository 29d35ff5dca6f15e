"""The block manager: a thin, batch-first API over the host and disk tiers.

Blocks are keyed by sequence hash (unsigned 64-bit). Every call takes a batch,
crosses into Rust once and releases the GIL while data moves. The policy
(LRU per tier, host -> disk offload, promotion on get) is documented in
``rust/manager/mod.rs`` and pinned down by ``tests/test_manager.py``'s model.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import logging
import math
import operator
import os
import queue
import threading
from typing import (Any, Callable, Dict, Generator, List, NamedTuple, Optional, Sequence, Set,
                    Tuple, Union)

from . import _core
from ._once import LogOnce
from .config import Config, canonical_dtype
from .disk import DiskStorage
from .host import HostStorage

log = logging.getLogger("dynblock")

Hashes = Union[Sequence[int], Any]  # a sequence of ints or a numpy uint64 array
Rows = Optional[Union[Sequence[int], Any]]  # one row index per hash, or None


def _hash_ints(hashes: Any) -> list:
    """Hashes as a list of Python ints (for job bookkeeping; the engine
    checks them)."""
    try:
        return [int(h) for h in (hashes.tolist() if hasattr(hashes, "tolist") else hashes)]
    except (TypeError, ValueError):
        return []  # not hashes: the call itself will say so


def _hash_value(hash: Any) -> int:
    """A hash given as a Python or numpy integer (not a bool), as an int."""
    if isinstance(hash, bool) or not hasattr(hash, "__index__"):
        raise TypeError(f"hash must be an integer in 0..2**64, got {type(hash).__name__} {hash!r}")
    v = operator.index(hash)
    if not 0 <= v < 2**64:
        raise ValueError(f"hash must be an integer in 0..2**64, got {v}")
    return v


def _namespace(namespace: Any) -> Optional[str]:
    """A ``namespace=`` argument checked: None (the shared namespace) or a
    non-empty str of at most 1024 bytes of UTF-8."""
    if namespace is None:
        return None
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be a str or None, got {type(namespace).__name__} {namespace!r}")
    n = len(namespace.encode("utf-8", "surrogatepass"))
    if not 0 < n <= 1024:
        raise ValueError(f"namespace must be a non-empty str of at most 1024 bytes of UTF-8 "
                         f"(or None for the shared namespace), got one of {n} bytes")
    return namespace


def _layout_fingerprint(config: Config) -> int:
    lay = config.layout
    if lay is None:
        return 0
    # The canonical dtype name: "bf16", "bfloat16" and torch.bfloat16 are one layout.
    text = f"{lay.num_layers}/{lay.outer_dim}/{lay.page_size}/{lay.inner_dim}/{canonical_dtype(lay.dtype)}"
    if lay.per_layer:
        text += "/per-layer"  # stores made before per_layer existed keep their fingerprint
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class TierView:
    """A read-only look at one of a manager's tiers (``BlockManager.host`` /
    ``.disk``): its settings and state, and read-only views of its memory.
    Writing through the tier would change cached blocks behind the
    manager's back (their checksums and their hashes' meaning), so the
    manager never hands out the tier itself."""

    #: Exactly the tier classes' read-only attributes (declared once, there).
    _READ = {"host": HostStorage.READ_ONLY, "disk": DiskStorage.READ_ONLY}

    __slots__ = ("_tier", "_kind")

    def __init__(self, tier: Union[HostStorage, DiskStorage], kind: str) -> None:
        self._tier = tier
        self._kind = kind

    def __getattr__(self, name: str) -> Any:
        if name in TierView._READ[object.__getattribute__(self, "_kind")]:
            return getattr(object.__getattribute__(self, "_tier"), name)
        raise AttributeError(
            f"{name!r}: a manager's {object.__getattribute__(self, '_kind')} tier is read-only "
            "here (writing through it would corrupt cached blocks); use the BlockManager's calls")

    def view(self) -> memoryview:
        """Read-only view of the whole host tier (host only)."""
        if not isinstance(self._tier, HostStorage):
            raise AttributeError("view() is a host-tier call")
        return self._tier.view().toreadonly()

    def block(self, slot_id: int) -> memoryview:
        """Read-only view of one host slot (host only)."""
        if not isinstance(self._tier, HostStorage):
            raise AttributeError("block() is a host-tier call")
        return self._tier.block(slot_id).toreadonly()

    def placement(self) -> Dict[int, int]:
        """Pages per NUMA node (host only; see HostStorage.placement)."""
        if not isinstance(self._tier, HostStorage):
            raise AttributeError("placement() is a host-tier call")
        return self._tier.placement()

    def __repr__(self) -> str:
        return f"TierView({self._tier!r})"


class TierEvent(NamedTuple):
    """A change of what a tier holds (see :meth:`BlockManager.watch_events`):
    ``kind`` is ``"stored"`` (the block took a slot of ``tier``; its bytes may
    still be on their way, and a write that fails takes it back with a
    ``"removed"``), ``"removed"`` (it left ``tier``: evicted, moved, removed,
    failed its check) or ``"cleared"`` (every block left every tier; ``tier``
    None, ``hash`` 0). ``namespace``: the block's namespace (None: the shared
    one)."""

    kind: str
    tier: Optional[str]
    hash: int
    namespace: Optional[str] = None


class Lease:
    """Blocks kept for a coming load: returned by :meth:`BlockManager.lookup`.

    ``count`` is the longest stored prefix of the hashes looked up (as
    :meth:`~BlockManager.match` would say). Until the lease is used by
    ``manager.get(lease, dst)`` or released (``release()``, leaving a ``with``
    block, or garbage collection), its blocks are neither evicted nor their
    slots reused, so the load returns ``count`` blocks even while other
    threads fill the cache. Only an explicit ``remove``/``clear`` of a leased
    block, or a block that fails its checksum or read, ends the prefix early.
    """

    __slots__ = ("_manager", "_id", "count", "_done", "namespace")

    def __init__(self, manager: "BlockManager", lease_id: int, count: int,
                 namespace: Optional[str] = None) -> None:
        self._manager = manager
        self._id = lease_id
        self.count = count
        self._done = False
        #: The namespace its blocks were looked up in.
        self.namespace = namespace

    @property
    def active(self) -> bool:
        """Not yet used nor released."""
        return not self._done

    def release(self) -> None:
        """Let the blocks be evicted again. Idempotent."""
        if not self._done:
            self._done = True
            if not self._manager.closed:
                self._manager._m.release_lease(self._id)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"Lease(count={self.count}{', active' if not self._done else ''})"


class _Callbacks:
    """The thread that runs a manager's job done-callbacks, one after another
    in the order the jobs finished. Not the job threads: a callback may wait
    for other jobs (``wait()``, ``wait_all()``) or close the manager without
    stalling the jobs it waits for. Started on first use; ``close()`` lets it
    run what is queued and end."""

    #: How long ``close()`` waits for a callback that is still running.
    JOIN_S = 10.0

    def __init__(self) -> None:
        self._q: "queue.SimpleQueue[Optional[tuple]]" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._closed = False

    def call(self, fn: Callable[["Job"], Any], job: "Job") -> None:
        with self._lock:
            if not self._closed and self._thread is None:
                t = threading.Thread(target=self._run, name="dynblock-callbacks", daemon=True)
                try:
                    t.start()
                except RuntimeError as e:  # no thread to be had: run it here rather than drop it
                    log.warning("dynblock: cannot start the callback thread (%s); running a "
                                "job's callback on the thread that finished it", e)
                    _run_one(fn, job)
                    return
                self._thread = t
            if self._thread is None:  # closed: nothing will run it later
                _run_one(fn, job)
                return
            self._q.put((fn, job))

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            _run_one(*item)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            t, self._thread = self._thread, None
            if t is None:
                return
            self._q.put(None)  # after what is queued
        if t is not threading.current_thread():
            t.join(self.JOIN_S)
            if t.is_alive():
                log.warning("dynblock: a job's done-callback still runs %.0f s after close(); "
                            "not waiting for it", self.JOIN_S)


def _run_one(fn: Callable[["Job"], Any], job: "Job") -> None:
    try:
        fn(job)
    except Exception:
        log.exception("dynblock: a job's done-callback raised")


class Job:
    """A transfer running in the background: returned by
    :meth:`BlockManager.put_async` and :meth:`BlockManager.get_async`.

    ``done()`` never blocks; ``wait(timeout=None)`` returns the call's result
    (blocks stored or loaded) or re-raises its error, and raises
    ``TimeoutError`` when the job is not done in time; ``await job`` works in
    asyncio. The job keeps its buffer (and lease) alive until it finishes:
    do not modify a ``put`` source or read a ``get`` destination before then.
    """

    __slots__ = ("_future", "_what", "_callbacks")

    def __init__(self, future: "concurrent.futures.Future[int]", what: str,
                 callbacks: Optional[_Callbacks] = None) -> None:
        self._future = future
        self._what = what
        self._callbacks = callbacks

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: Optional[float] = None) -> int:
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"the {self._what} job is not done after {timeout} s") from None

    def add_done_callback(self, fn: Callable[["Job"], Any]) -> None:
        """Call ``fn(job)`` once the job has finished: on the manager's
        callback thread (one per manager, callbacks in the order their jobs
        finished), or at once on this thread when the job has finished
        already. ``job.wait(0)`` then gives its result or raises its error.
        ``fn`` may wait for other jobs or close the manager; an exception it
        raises is logged. A slow ``fn`` delays the callbacks after it."""
        cbs = self._callbacks
        if cbs is None or self._future.done():
            self._future.add_done_callback(lambda _f: _run_one(fn, self))
        else:
            self._future.add_done_callback(lambda _f: cbs.call(fn, self))

    def __await__(self) -> Generator[Any, None, int]:
        return asyncio.wrap_future(self._future).__await__()

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"Job({self._what}, {state})"


class BlockManager:
    """Store KV blocks by sequence hash in a host tier and/or a disk tier.

    >>> cfg = Config(block_size=2 << 20, host_blocks=1024, disk_blocks=16384, disk_dir="/mnt/nvme")
    >>> with BlockManager(cfg) as kv:                                # doctest: +SKIP
    ...     kv.put(hashes, blocks)       # evicted from the GPU
    ...     n = kv.match(request_hashes) # how much prefix is cached
    ...     kv.get(request_hashes[:n], out)
    """

    def __init__(self, config: Config) -> None:
        if not isinstance(config, Config):
            raise TypeError(f"config must be a dynblock.Config, got {type(config).__name__}")
        self.config = config
        bs = int(config.block_size)  # type: ignore[arg-type]
        self._host: Optional[HostStorage] = None
        self._disk: Optional[DiskStorage] = None
        try:
            if config.host_blocks:
                self._host = HostStorage(
                    int(config.host_blocks),
                    bs,
                    numa_node=config.numa_node,
                    gpu=config.gpu,
                    pin=config.pin,
                    huge_pages=config.huge_pages,
                    worker_nice=config.worker_nice,
                )
            if config.disk_blocks:
                self._disk = DiskStorage(
                    str(config.disk_path if config.persist else config.disk_dir),
                    int(config.disk_blocks),
                    bs,
                    o_direct=config.o_direct,
                    preallocate=config.preallocate,
                    io_depth=config.io_depth,
                    engine=config.disk_engine,
                    persist=config.persist,
                    worker_nice=config.worker_nice,
                )
            self._m = _core.BlockManager(
                bs,
                host=self._host._h if self._host else None,
                disk=self._disk._s if self._disk else None,
                checksums=config.checksums,
                write_through=config.write_through,
                index_path=(str(config.disk_path) + ".index") if config.persist else None,
                sync=config.durability == "sync",
                layout=_layout_fingerprint(config),
                write_behind=config.write_behind,
                disk_admission=config.disk_admission,
                host_eviction=config.host_eviction,
                disk_eviction=config.disk_eviction,
            )
            self._remote: Optional[_core.RemoteTier] = None
            if config.remote:
                self._remote = _core.RemoteTier(
                    config.remote, bs, prefix=config.remote_prefix, ttl_s=config.remote_ttl_s,
                    timeout_ms=config.remote_timeout_ms, ca_file=config.remote_ca_file,
                    layout=_layout_fingerprint(config), secret=config.remote_secret,
                    queue_bytes=config.remote_queue_bytes,
                    check_threads=config.remote_check_threads)
                self._m.attach_remote(self._remote, config.remote_write)
            self._jobs: Optional[concurrent.futures.ThreadPoolExecutor] = None
            self._jobs_pid = 0
            self._pending: Set["concurrent.futures.Future[int]"] = set()
            # hash -> the latest put job storing it that has not finished
            # (namespace, hash) of a block -> the put job storing it
            self._inflight: Dict[Tuple[Optional[str], int], "concurrent.futures.Future[int]"] = {}
            self._jobs_lock = threading.RLock()
            self._callbacks = _Callbacks()
            self._events_lost = 0
            self._once = LogOnce(log)
        except BaseException:
            # Leave nothing behind: a data file this call created goes too.
            if self._disk is not None:
                self._disk._s.abandon()
                self._disk = None
            self._close_tiers()
            raise
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("BlockManager is closed")

    @classmethod
    def open(cls, path: str, **config: Any) -> "BlockManager":
        """Open (or create) the persistent store at ``path``: its data file,
        with the index beside it at ``path + ".index"``. ``config`` are
        :class:`Config` fields (``block_size``/``layout`` and ``disk_blocks``
        must match what the store was made with)."""
        return cls(Config(disk_path=path, persist=True, **config))

    def flush(self) -> None:
        """Wait for write-behind: the host-only blocks it would write ahead of
        their eviction (the least recent half of the host tier) are written
        to disk now."""
        self._check_open()
        self._m.flush()

    def sync(self) -> None:
        """fdatasync the data file, then the index: everything stored so far
        survives power loss."""
        self._check_open()
        self._m.sync()

    @property
    def persistent(self) -> bool:
        return self._m.persistent

    # --- the batch API ----------------------------------------------------
    def put(self, hashes: Hashes, src: Any, rows: Rows = None, *, namespace: Optional[str] = None) -> int:
        """Store ``len(hashes)`` blocks, back to back in ``src`` or, with
        ``rows``, block ``i`` from row ``rows[i]`` of ``src`` seen as
        ``[n_rows, block_size]`` bytes (a gather from one large KV buffer).
        Blocks already stored are skipped (and refreshed). Returns how many
        were new. Every check runs before any byte moves.

        ``namespace`` (every call that names blocks takes it): the blocks'
        namespace, a str (a tenant, a ``cache_salt``); None (the default) is
        the shared one. A block is its hash within its namespace: the same
        hash in two namespaces is two blocks that never alias. A persistent
        store keeps its namespaces' names across a restart."""
        self._check_open()
        if namespace is None:  # (the common case: no argument for the engine to parse)
            return self._m.put(hashes, src, rows)
        return self._m.put(hashes, src, rows, _namespace(namespace))

    def match(self, hashes: Hashes, *, namespace: Optional[str] = None) -> int:
        """Length of the longest prefix of ``hashes`` stored in any tier."""
        self._check_open()
        if namespace is None:
            return self._m.match(hashes)
        return self._m.match(hashes, _namespace(namespace))

    def get(self, hashes: Union[Hashes, Lease], dst: Any, rows: Rows = None, *,
            namespace: Optional[str] = None) -> int:
        """Copy the longest stored prefix of ``hashes`` into ``dst`` (writable,
        ``len(hashes) * block_size`` bytes) or, with ``rows``, block ``i`` into
        row ``rows[i]`` of ``dst`` (distinct rows: a scatter into one large KV
        buffer); returns the prefix length. Blocks read from disk are promoted
        into the host tier. Bytes past the returned count (or rows of blocks
        past it) are unspecified.

        Given a :class:`Lease` instead of hashes, reads its ``count`` blocks
        (``dst`` sized for ``count`` blocks, or ``rows`` with ``count``
        entries) and releases it; returns ``lease.count`` (its blocks are
        those of the lease's namespace)."""
        self._check_open()
        ns = namespace if namespace is None else _namespace(namespace)
        if isinstance(hashes, Lease):
            lease = hashes
            if lease._manager is not self:
                raise ValueError("this lease belongs to another BlockManager")
            if lease._done:
                raise ValueError("this lease was already used or released: take a new one with lookup()")
            n = self._m.get_lease(lease._id, dst, rows)
            lease._done = True
            return n
        return self._m.get(hashes, dst, rows) if ns is None else self._m.get(hashes, dst, rows, ns)

    def get_each(self, hashes: Union[Hashes, Lease], dst: Any, rows: Rows = None, *,
                 namespace: Optional[str] = None) -> List[bool]:
        """:meth:`get` of hashes, but past a block that is missing or fails its
        check (a checksum, a read error) the blocks after it are still read:
        returns, for each hash, whether its block arrived in ``dst`` (or its
        row). For an engine that recomputes exactly the blocks that did not
        arrive. (For a :class:`Lease`, see :meth:`get_each_async`.)"""
        return self._get_each(hashes, dst, rows, None, _namespace(namespace))

    def _get_each(self, what: Union[Hashes, Lease], dst: Any, rows: Rows,
                  lease_hashes: Optional[Sequence[int]], ns: Optional[str]) -> List[bool]:
        self._check_open()
        if isinstance(what, Lease):
            n_all = what.count
            hs = list(lease_hashes or [])[:n_all]
            ns = what.namespace
        else:
            hs = _hash_ints(what)
            n_all = len(hs)
        idx = [int(r) for r in (rows.tolist() if hasattr(rows, "tolist") else rows)] \
            if rows is not None else list(range(n_all))
        if isinstance(what, Lease):
            n = self.get(what, dst, idx[:n_all])
        else:
            n = self.get(what, dst, rows, namespace=ns)
        ok = [True] * n + [False] * (n_all - n)
        i = n + 1  # the block at n did not arrive; the ones after it may
        while i < n_all and i < len(hs):
            k = self._m.get(hs[i:], dst, idx[i:], ns)
            ok[i:i + k] = [True] * k
            i += k + 1
        return ok

    # --- asynchronous jobs --------------------------------------------------
    #: Worker threads running jobs. The calls they make release the GIL and
    #: the manager's lock while bytes move, so jobs overlap.
    JOB_WORKERS = 4

    def _submit(self, what: str, fn: Any, *args: Any, stores: Optional[list] = None) -> Job:
        self._check_open()
        with self._jobs_lock:
            if self._jobs is not None and self._jobs_pid != os.getpid():
                self._m.contains(0)  # in a fork()ed child: raises ForkError, says what to do
            if self._jobs is None:
                self._jobs_pid = os.getpid()
                self._jobs = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.JOB_WORKERS, thread_name_prefix="dynblock-job")
            fut = self._jobs.submit(fn, *args)
            self._pending.add(fut)
            for k in stores or ():
                self._inflight[k] = fut
            fut.add_done_callback(lambda f: self._job_done(f, stores))
        return Job(fut, what, self._callbacks)

    def _job_done(self, fut: "concurrent.futures.Future[int]", stores: Optional[list]) -> None:
        with self._jobs_lock:
            self._pending.discard(fut)
            for k in stores or ():
                if self._inflight.get(k) is fut:
                    del self._inflight[k]

    def put_async(self, hashes: Hashes, src: Any, rows: Rows = None, *,
                  namespace: Optional[str] = None) -> Job:
        """:meth:`put` in the background: returns a :class:`Job` at once."""
        ns = _namespace(namespace)
        return self._submit("put", functools.partial(self.put, namespace=ns), hashes, src, rows,
                            stores=[(ns, h) for h in _hash_ints(hashes)])

    def get_async(self, hashes: Union[Hashes, Lease], dst: Any, rows: Rows = None, *,
                  namespace: Optional[str] = None) -> Job:
        """:meth:`get` (of hashes or a :class:`Lease`) in the background:
        returns a :class:`Job` at once. A get submitted after a put of the same
        hash sees it: it waits for those puts (jobs start in submission order,
        so they are already running); other jobs run side by side."""
        ns = _namespace(namespace)
        return self._get_job(hashes, ns, lambda: self.get(hashes, dst, rows, namespace=ns))

    def _get_job(self, hashes: Union[Hashes, Lease], ns: Optional[str], read: Callable[[], Any]) -> Job:
        """A job running ``read()`` once the puts of the same blocks (hashes
        in namespace ``ns``) submitted before it have finished."""
        deps = []
        if not isinstance(hashes, Lease):
            with self._jobs_lock:
                deps = list({id(f): f for f in (self._inflight.get((ns, h))
                                                for h in _hash_ints(hashes)) if f}.values())

        def run() -> Any:
            if deps:
                concurrent.futures.wait(deps)
            return read()

        return self._submit("get", run)

    def get_each_async(self, hashes: Union[Hashes, Lease], dst: Any, rows: Rows = None,
                       lease_hashes: Optional[Sequence[int]] = None, *,
                       namespace: Optional[str] = None) -> Job:
        """:meth:`get_each` in the background (a :class:`Job` whose result is
        the list of booleans). With a :class:`Lease`, ``lease_hashes`` are the
        hashes it was looked up with: blocks after one that fails are then
        read by hash."""
        ns = _namespace(namespace)
        return self._get_job(hashes, ns, lambda: self._get_each(hashes, dst, rows, lease_hashes, ns))

    def wait_all(self, timeout: Optional[float] = None) -> None:
        """Wait for every job submitted so far (their errors stay with each
        job's ``wait()``); ``TimeoutError`` when they are not done in time."""
        with self._jobs_lock:
            pending = list(self._pending)
        _, not_done = concurrent.futures.wait(pending, timeout)
        if not_done:
            raise TimeoutError(f"{len(not_done)} job(s) not done after {timeout} s")

    def lookup(self, hashes: Hashes, timeout: Optional[float] = None, *,
               namespace: Optional[str] = None) -> Lease:
        """Pin the longest stored prefix of ``hashes`` until it is loaded with
        ``get(lease, dst)`` or released: see :class:`Lease`. Takes no local
        I/O; with a remote tier, the blocks the local tiers miss are fetched
        into them (and leased), within ``remote_timeout_ms`` or ``timeout``
        seconds when that is sooner (what the remote cannot deliver in time
        is left out of the lease)."""
        self._check_open()
        ns = _namespace(namespace)
        lease_id, count = self._m.lookup(hashes, timeout, ns)
        return Lease(self, lease_id, count, ns)

    def touch(self, hashes: Hashes, *, namespace: Optional[str] = None) -> int:
        """Mark the stored blocks among ``hashes`` as the most recently used
        (in the order given, the last one newest) without reading them;
        returns how many were stored. Takes no I/O."""
        self._check_open()
        return self._m.touch(hashes, _namespace(namespace))

    def contains(self, hash: int, *, namespace: Optional[str] = None) -> bool:
        """Whether ``hash`` (a Python or numpy integer) is stored in any tier
        (in ``namespace``; ``hash in manager`` asks the shared one)."""
        self._check_open()
        if namespace is None:
            return self._m.contains(_hash_value(hash))
        return self._m.contains(_hash_value(hash), _namespace(namespace))

    def __contains__(self, hash: object) -> bool:
        self._check_open()
        try:
            v = _hash_value(hash)
        except (TypeError, ValueError):
            return False
        return self._m.contains(v)

    def __len__(self) -> int:
        self._check_open()
        return len(self._m)

    def remove(self, hashes: Hashes, *, namespace: Optional[str] = None, remote: bool = False,
               timeout: float = 30.0) -> int:
        """Forget blocks; returns how many the local tiers held.

        With ``remote=True`` they are deleted from the remote tier too (one
        pipelined ``UNLINK`` per block, sent to the master holding it), after
        the local tiers forgot them and the background writer dropped or
        finished sending them, within ``timeout`` seconds;
        ``stats()["remote_deleted"]`` counts the keys the server held. Cut
        short: :class:`RemoteError` as for :meth:`purge` (the local part done;
        call again to go on)."""
        ns = _namespace(namespace)
        r = self._remote_for("remove", remote, timeout)
        n = self._m.remove(hashes, ns)
        if r is not None:
            r.remove(ns, hashes, float(timeout))
        return n

    def _remote_for(self, what: str, remote: Any, timeout: Any) -> "Optional[_core.RemoteTier]":
        """The remote tier a ``what(..., remote=True, timeout=...)`` call
        deletes from (None for ``remote=False``), its arguments checked and
        the manager open, before anything changes."""
        if not isinstance(remote, bool):
            raise TypeError(f"remote must be a bool, got {remote!r}")
        if remote and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                       or not math.isfinite(timeout) or timeout <= 0):
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        self._check_open()
        if remote and self._remote is None:
            raise ValueError(f"{what}(remote=True) needs a remote tier (Config(remote=...)); "
                             "this manager has none")
        return self._remote if remote else None

    def purge(self, namespace: str, *, remote: bool = False, timeout: float = 30.0) -> int:
        """Forget every block of ``namespace`` in the local tiers (a
        persistent store records it before anything changes); returns how
        many there were. The name stays known.

        With ``remote=True`` the remote tier's keys of the namespace are
        deleted too (``SCAN`` on every master, ``UNLINK`` of what it finds;
        other namespaces, prefixes, layouts and block sizes untouched), after
        the local tiers forgot the blocks and the background writer dropped
        or finished sending the namespace's queued ones, within ``timeout``
        seconds; ``stats()["remote_deleted"]`` counts the keys deleted. A
        remote purge cut short (the timeout, the server) raises
        :class:`RemoteError` saying how many keys it deleted, with the local
        tiers already purged: call again to go on. Other processes' local
        tiers keep their copies (purge there too), and calls in the
        namespace running meanwhile (here or in another process) may bring
        blocks back: stop its traffic first."""
        ns = _namespace(namespace)
        if ns is None:
            raise TypeError("purge needs a namespace (a str); clear() forgets every block")
        r = self._remote_for("purge", remote, timeout)
        n = self._m.purge(ns)
        if r is not None:
            r.purge(ns, float(timeout))
        return n

    def set_quota(self, namespace: str, host_bytes: Optional[int] = None,
                  disk_bytes: Optional[int] = None) -> None:
        """Give ``namespace`` a quota of ``host_bytes`` of the host tier and
        ``disk_bytes`` of the disk tier (None: no quota in that tier),
        replacing its earlier quota. A quota is whole blocks (the bytes
        rounded down), at least one block. A namespace at its quota in a tier
        makes room for its next block there by evicting one of its own (its
        least recently used with ``"lru"``; with ``"s3fifo"`` the one S3-FIFO
        picks among its own blocks, the namespace's share of them in the
        small queue standing in for the tier's), never another namespace's:
        one tenant's flood cannot push out another's blocks once the quotas
        add up to no more than the tier. Blocks past a lowered quota are
        evicted at once (host victims offloaded to disk as usual). A
        persistent store keeps quotas across a restart (blocks past a quota
        after a crash leave at the namespace's next put), and its disk tier's
        order, each namespace's included. The shared namespace has no quota."""
        ns = _namespace(namespace)
        if ns is None:
            raise TypeError("set_quota needs a namespace (a str); the shared namespace has no quota")
        for what, v in (("host_bytes", host_bytes), ("disk_bytes", disk_bytes)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"{what} must be an int >= 0 or None, got {v!r}")
        self._check_open()
        self._m.set_quota(ns, host_bytes, disk_bytes)

    def register_buffer(self, buf: Any) -> Optional[int]:
        """Register ``buf``, long-lived memory that puts read from and gets
        write into many times (an engine's staging buffer), with the disk
        tier's io_uring engine: direct I/O between it and the disk then
        skips pinning its pages for every operation (see
        :meth:`DiskStorage.register_buffer`). Held until
        :meth:`unregister_buffer` or :meth:`close`. Returns the
        registration's id, or None without a disk tier or io_uring engine,
        for memory on huge pages (left as it is: pinning them per I/O is
        cheap), or where the kernel refuses to pin it; ``stats()["disk"]`` shows ``registered_bytes``, ``fixed_ios``
        (I/Os that used registered memory) and ``registration_skipped`` (why
        the last buffer was left unregistered, or the kernel refused one)."""
        self._check_open()
        return None if self._disk is None else self._disk.register_buffer(buf)

    def unregister_buffer(self, registration: int) -> bool:
        """Forget a registration from :meth:`register_buffer`; False when it
        is not one."""
        self._check_open()
        return False if self._disk is None else self._disk.unregister_buffer(registration)

    def namespaces(self) -> List[str]:
        """The namespaces this store has a name for, in the order they first
        got a block (a persistent store's include those of earlier runs)."""
        self._check_open()
        return self._m.namespaces()

    def clear(self) -> None:
        self._check_open()
        self._m.clear()

    _MISSING: Any = object()

    def stats(self, namespace: Any = _MISSING) -> Dict[str, Any]:
        """Counters (hits and misses per tier, blocks and bytes offloaded and
        onboarded, evictions, corrupt and unreadable blocks) and the tiers'
        actual modes.

        With ``namespace=`` (a name, or None for the shared one): that
        namespace's part only: ``namespace``, its calls' ``put_blocks``,
        ``put_new``, ``host_hits``, ``disk_hits``, ``remote_hits`` (blocks
        its gets and lookups fetched from the remote tier; also in
        ``misses``, the local tiers' misses), ``misses`` (since this
        manager opened), the slots and bytes its blocks hold now
        (``host_blocks_used``, ``disk_blocks_used``, ``host_bytes_used``,
        ``disk_bytes_used``) and its quota (``host_quota_bytes``,
        ``disk_quota_bytes``; None: none)."""
        self._check_open()
        if namespace is not BlockManager._MISSING:
            ns = _namespace(namespace)
            part: Dict[str, Any] = {"namespace": ns}
            part.update(self._m.namespace_counters(ns))
            return part
        out: Dict[str, Any] = dict(self._m.counters())
        r = self._remote
        if r is not None:
            r.log_warnings()
            out.update(r.counters())
        out["block_size"] = self._m.block_size
        out["blocks"] = len(self._m)
        out["events_lost"] = self._events_lost
        h, d = self._host, self._disk
        out["host"] = None if h is None else {
            "capacity_blocks": h.num_blocks,
            "numa_node": h.numa_node,
            "policy": h.policy,
            "pinned": h.pinned,
            "huge_pages": h.huge_pages,
            "numa_reason": h.numa_reason,
        }
        out["disk"] = None if d is None else {
            "persistent": self._m.persistent,
            "checksums": self.config.checksums,
            "capacity_blocks": d.num_blocks,
            "o_direct": d.o_direct,
            "fallback_reason": d.fallback_reason,
            "alignment": d.alignment,
            "slot_stride": d.slot_stride,
            "fs_type": d.fs_type,
            "path": d.path,
            "engine": d.engine,
            **dict(zip(("registered_bytes", "fixed_ios", "registration_skipped"), d.registration)),
        }
        out["remote"] = None if r is None else {
            "url": r.url,  # without its password
            "cluster": r.cluster,
            "down": r.down,
            "refusing_writes": r.refusing_writes,  # e.g. OOM at maxmemory; reads go on
            "queued": r.queued,
            "write": self.config.remote_write,
            "prefix": self.config.remote_prefix,
            "authenticated": self.config.remote_secret is not None,  # values carry a MAC
        }
        return out

    def watch_events(self, capacity: int = 65536) -> None:
        """Record every change of what the host and disk tiers hold from now on
        (a :class:`TierEvent` per block stored into or removed from a tier, in
        the order they happen), for :meth:`take_events`, starting with a
        ``"stored"`` for every block held now (host, then disk; a persistent
        store's recovered blocks among them), so that a watcher that applies
        them in order knows what each tier holds. At most ``capacity``
        wait to be taken; past that the oldest are dropped, counted in
        ``stats()["events_lost"]`` and logged once. ``capacity=0`` stops
        recording. The remote tier's contents are the server's, not
        reported here."""
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be an int >= 0, got {capacity!r}")
        self._check_open()
        self._m.watch_events(capacity)

    def take_events(self) -> List[TierEvent]:
        """The :class:`TierEvent` recorded since the last call, oldest first
        (none unless :meth:`watch_events` was called)."""
        self._check_open()
        events, lost = self._m.take_events()
        if lost:
            self._events_lost += lost
            self._once("events_lost", "dynblock: %d tier events were dropped: more than "
                       "watch_events' capacity waited to be taken (logged once; counted in "
                       "stats()['events_lost'])", lost)
        return [TierEvent(k, t, h, ns) for k, t, h, ns in events]

    def lru_order(self) -> "tuple[list[int], list[int]]":
        """(host, disk) hashes in eviction order, first to leave first: least
        recently used first with ``"lru"`` eviction; with ``"s3fifo"`` the small
        queue, then the main queue, each oldest first."""
        self._check_open()
        return self._m.lru_order()

    @property
    def block_size(self) -> int:
        return self._m.block_size

    @property
    def host(self) -> Optional[TierView]:
        """The host tier, read-only (settings, state, read-only views)."""
        return None if self._host is None else TierView(self._host, "host")

    @property
    def disk(self) -> Optional[TierView]:
        """The disk tier, read-only (settings and state)."""
        return None if self._disk is None else TierView(self._disk, "disk")

    # --- lifetime ---------------------------------------------------------
    def _close_tiers(self) -> None:
        if self._disk is not None:
            self._disk.close()
        if self._host is not None:
            self._host.close()

    def close(self, flush: bool = True) -> None:
        """Close both tiers and the index, releasing files and worker threads at
        once (the disk file disappears unless persistent). Idempotent. Every
        later call raises ``ValueError("BlockManager is closed")``.

        A persistent store first writes the blocks that live only in the host
        tier to disk, most recent first, as many as the disk tier holds (its
        least recent blocks make room), so a restart finds the hottest blocks
        too. ``flush=False`` skips that. If that write fails, the store is
        closed anyway and the error is raised. Pending jobs finish first."""
        if self._closed:
            return
        with self._jobs_lock:
            jobs, self._jobs = self._jobs, None
        if jobs is not None:
            if threading.current_thread() in getattr(jobs, "_threads", ()):
                # A job thread cannot wait for itself; close from a callback instead.
                with self._jobs_lock:
                    self._jobs = jobs
                raise RuntimeError("BlockManager.close() was called on one of its own job "
                                   "threads, which cannot wait for itself; call it from a "
                                   "job's done-callback or another thread")
            jobs.shutdown(wait=True)  # pending jobs finish first
        self._closed = True
        try:
            self._m.close(flush)
        finally:
            self._close_tiers()
            self._callbacks.close()  # after what is queued (from this thread: no wait)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "BlockManager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._closed:
            return f"BlockManager(closed, {self.config!r})"
        return f"BlockManager({len(self)} blocks, {self.config!r})"
