"""``python -m dynblock.store PATH info|verify|compact|clear|purge [--json]``: look
at and look after a persistent store (``Config(persist=True, disk_path=PATH)``:
the data file ``PATH`` and its index ``PATH.index``) without writing Python.

- ``info``: geometry, store id, blocks and bytes stored (and how many in
  each namespace), index records and damaged ones, the blocks disk admission remembers having turned away, when
  the store was last opened and whether it was closed cleanly since (and
  when), and which process holds the store, if one does. It reads the
  files without changing them and without the store's lock, so it also works
  while an engine has the store open (a record being appended then shows as a
  torn tail).
- ``verify``: reads every stored block and checks it against the checksum its
  index recorded, with a progress bar and a summary; ``--drop-bad`` removes
  the blocks that fail (their index records too). Exit status 1 when a block
  failed and was kept. A failed block of a namespace is reported with it.
- ``compact``: rewrites the index with one record per stored block (and one
  per block ``disk_admission="reuse"`` remembers having turned away).
- ``clear``: removes every block (the data file keeps its size).
- ``purge --namespace NAME``: removes every block of one namespace (a
  tenant). With ``--remote``, also deletes the namespace's keys on the
  remote tier the environment names, as an engine's ``Config.from_env()``
  reads it (``DYNBLOCK_REMOTE_URL``, ``DYNBLOCK_REMOTE_PREFIX``,
  ``DYNBLOCK_REMOTE_SECRET``, ``DYNBLOCK_REMOTE_CA_FILE``), for the store's
  block size and layout fingerprint, within ``--timeout`` seconds (30): see
  ``BlockManager.purge``. A remote purge cut short exits with status 1 after
  the local one, saying how many keys it deleted (run it again to go on).

:class:`Reader` is the same read-only look for programs: a process that reads
the blocks another process (the store's writer) stores, following its index.

``verify``, ``compact``, ``clear`` and ``purge`` open the store the way an engine does,
exclusively: while another process holds it they are refused, naming that
process (never a second writer). Exit status 2 for a refusal or bad input.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import threading
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import _core
from ._core import DynblockError, StoreLockedError
from .bench.common import Progress
from .buffers import aligned_empty

#: Bytes read per step of ``verify``: one step fills the disk tier's queue at
#: 2 MiB blocks (16 reads). Measured (512 MiB of 2 MiB blocks, virtio disk,
#: against the manager's cold reads with checksums): 16 MiB steps 0.84-0.93x,
#: 32 MiB and 64 MiB 0.96-0.98x.
VERIFY_STEP = 32 << 20
#: Steps of ``verify`` read ahead of the one being checked (the check of a
#: step takes a fifth of its read; two ahead measured no faster).
AHEAD = 1


class Refused(Exception):
    """The store cannot be opened for this command (held elsewhere, or not a store)."""


def holder(path: str) -> Optional[Tuple[int, str]]:
    """(pid, command line) of the process holding the store's file lock, from
    ``/proc/locks``; None when nobody holds it (or the system does not say)."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        parts = line.split()
        if "FLOCK" not in parts or "->" in parts or dev not in parts:
            continue
        try:
            pid = int(parts[parts.index(dev) - 1])
        except ValueError:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmd = ""
        return pid, cmd
    return None


def _holder_text(path: str) -> str:
    h = holder(path)
    if h is None:
        return "another process"
    pid, cmd = h
    return f"process {pid}" + (f" ({cmd})" if cmd else "")


def info(path: str, who: bool = True) -> Dict[str, Any]:
    """What ``info`` reports, as a dict (see the module docs); ``who=False``
    leaves out which process holds the store (``held_by`` None: reading
    ``/proc/locks`` can take milliseconds), for the commands that open it
    themselves and name the holder only when refused."""
    if not os.path.isfile(path):
        raise Refused(f"{path} is not a file: give the data file of a persistent store "
                      "(its index is PATH.index)")
    if not os.path.isfile(path + ".index"):
        raise Refused(f"{path}.index is missing: {path} is not a persistent store "
                      "(or its index was moved away)")
    try:
        d = dict(_core.inspect_store(path))
    except (DynblockError, ValueError, OSError) as e:
        raise Refused(str(e)) from None
    live = d.pop("live")
    names = d["namespaces"]
    per_ns: Dict[str, int] = {}
    for _, _, _, ns in live:
        if ns:
            name = names[ns - 1] if ns <= len(names) and names[ns - 1] else f"#{ns} (not in the table)"
            per_ns[name] = per_ns.get(name, 0) + 1
    bs = int(d.get("block_size") or d["index_block_size"])
    st = os.stat(path)
    h = holder(path) if who else None
    d.update(
        path=os.path.abspath(path),
        blocks=len(live),
        stored_bytes=len(live) * bs,
        fill=len(live) / d["index_num_blocks"] if d["index_num_blocks"] else 0.0,
        namespace_blocks=per_ns,
        data_file_bytes=st.st_size,
        data_file_allocated_bytes=st.st_blocks * 512,
        held_by=None if h is None else {"pid": h[0], "command": h[1]},
        index_matches_data=d.get("store_id") == d["index_store_id"],
    )
    return d


class _Open:
    """The store opened exclusively, as an engine opens it (a disk-only block
    manager over the data file and its index)."""

    def __init__(self, path: str, d: Dict[str, Any]) -> None:
        if not d["index_matches_data"]:
            raise Refused(f"{path}.index belongs to another data file (store id "
                          f"{d['index_store_id']}, the data file's is {d['store_id']})")
        bs, n = int(d["index_block_size"]), int(d["index_num_blocks"])
        try:
            self.disk = _core.DiskStorage(path, n, bs, persist=True)
        except StoreLockedError as e:
            if "open in another process" in str(e):
                raise Refused(f"the store {path} is held by {_holder_text(path)}; stop it "
                              "first (a store has one writer at a time)") from None
            raise Refused(str(e)) from None
        except (DynblockError, ValueError, OSError) as e:
            raise Refused(str(e)) from None
        try:
            self.m = _core.BlockManager(bs, disk=self.disk, index_path=path + ".index",
                                        layout=int(d["layout"]), checksums=bool(d["checksums"]),
                                        write_behind=False)
        except BaseException:
            self.disk.close()
            raise
        self.block_size = bs

    def close(self) -> None:
        self.m.close()
        self.disk.close()


class Reader:
    """A read-only view of a persistent store that another process writes
    (its one writer holds the lock; readers take none): for processes of one
    engine that read what one of them stores, such as SGLang's MLA ranks.

    It follows the writer's index: ``match`` re-reads it when the file changed
    since it was last read, and ``get_each`` answers from the blocks it listed
    then. A re-read parses the whole index, so it comes at most once per ten
    times the last one took (a reader spends at most about a tenth of its
    time on it): a ``match`` that finds every block it asks for answers from
    the index as it was, one that misses waits for the re-read.
    Blocks are read with ``pread`` (buffered) straight into the caller's rows
    and checked against the CRC32C the writer recorded for them: a block the
    writer evicted or rewrote since the index was read, or one caught half
    written, fails its check and is a miss, never wrong bytes. Stores written
    with ``checksums=False`` are refused (there is nothing to check against).
    Before the writer has created the store every block is a miss."""

    def __init__(self, path: str, block_size: int) -> None:
        self.path = os.fspath(path)
        self.block_size = int(block_size)
        self._map: Dict[int, Tuple[int, int]] = {}
        self._sig: Optional[Tuple[int, int, int]] = None
        self._fd: Optional[int] = None
        self._ino = -1
        self._offset = 0
        self._stride = 0
        self._next = 0.0
        self._old_fds: List[int] = []  # replaced data files: closed at close(), not under a reader
        self._lock = threading.Lock()
        self.refreshes = 0
        self.failed = 0
        self.refresh()

    def refresh(self, wait: bool = True) -> bool:
        """Re-read the index if it changed (``wait``: also when the last re-read
        was too recent, after waiting for it; else not then); returns whether
        it was re-read."""
        try:
            st = os.stat(self.path + ".index")
        except FileNotFoundError:
            return False
        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        if sig == self._sig:
            return False
        early = self._next - time.monotonic()
        if early > 0:
            if not wait:
                return False
            time.sleep(early)
        with self._lock:  # one re-read at a time; the others then find it done
            if sig == self._sig:
                return False
            return self._reread(sig)

    def _reread(self, sig: Tuple[int, int, int]) -> bool:
        now = time.monotonic()
        try:
            d = _core.inspect_store(self.path)
        except (DynblockError, ValueError, OSError):
            return False  # being created or rewritten: the next call tries again
        if d.get("block_size") is None or d["store_id"] != d["index_store_id"]:
            return False
        if int(d["block_size"]) != self.block_size:
            raise ValueError(f"the store {self.path} holds blocks of {d['block_size']} bytes, "
                             f"this reader expects {self.block_size}")
        if not d["checksums"]:
            raise ValueError(f"the store {self.path} was written without checksums: a reader "
                             "cannot tell a rewritten block from the one it expects")
        dst = os.stat(self.path)
        if dst.st_ino != self._ino:
            if self._fd is not None:
                self._old_fds.append(self._fd)
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            self._ino = dst.st_ino
        self._offset, self._stride = int(d["data_offset"]), int(d["slot_stride"])
        # The shared namespace's blocks (a namespaced block is another block, whatever its hash).
        self._map = {int(h): (int(slot), int(crc)) for h, slot, crc, ns in d["live"] if ns == 0}
        self._sig = sig
        self.refreshes += 1
        self._next = time.monotonic() + 10 * (time.monotonic() - now)
        return True

    @property
    def blocks(self) -> int:
        """Blocks the index listed when it was last read."""
        return len(self._map)

    def match(self, hashes: Sequence[int]) -> int:
        """Length of the longest prefix of ``hashes`` the store holds (as far
        as its index, re-read when it changed, says)."""
        n = self._run(hashes)
        if self.refresh(wait=n < len(hashes)):
            n = self._run(hashes)
        return n

    def _run(self, hashes: Sequence[int]) -> int:
        m = self._map
        for i, h in enumerate(hashes):
            if int(h) not in m:
                return i
        return len(hashes)

    def get_each(self, hashes: Sequence[int], dst: np.ndarray, rows: Sequence[int]) -> List[bool]:
        """Read block ``hashes[i]`` into row ``rows[i]`` of ``dst`` (a uint8
        array seen as rows of ``block_size``); returns which arrived intact
        (the rows of the others hold unspecified bytes)."""
        bs = self.block_size
        view = dst.reshape(-1, bs)
        out = []
        m, fd, offset, stride = self._map, self._fd, self._offset, self._stride
        for h, r in zip(hashes, rows):
            e = m.get(int(h))
            ok = False
            if e is not None and fd is not None:
                slot, crc = e
                row = view[int(r)]
                try:
                    got = os.preadv(fd, [row], offset + slot * stride)
                except OSError:
                    got = -1
                ok = got == bs and _core.block_crcs([int(h)], row, bs)[0] == crc
                if not ok:
                    self.failed += 1
            out.append(ok)
        return out

    def close(self) -> None:
        with self._lock:
            for fd in self._old_fds + ([self._fd] if self._fd is not None else []):
                os.close(fd)
            self._old_fds, self._fd, self._map = [], None, {}


def _check(o: _Open, live: Sequence[Tuple[int, int, int, int]], checksums: bool,
           show: bool) -> Tuple[List[Tuple[int, int]], List[Tuple[int, int]]]:
    """Read every block of ``live`` ((hash, slot, crc, namespace id)); returns
    the (hash, namespace id) of those that failed their checksum and of those
    that could not be read. Reads go in
    steps of ``VERIFY_STEP`` bytes into page-aligned buffers (O_DIRECT), the
    next ``AHEAD`` steps read on threads while this one is checked (both
    release the GIL)."""
    bs = o.block_size
    step = max(1, VERIFY_STEP // bs)
    parts = [live[i:i + step] for i in range(0, len(live), step)]
    # AHEAD reads in flight while one step is checked: one buffer each, and one for the check
    bufs = [aligned_empty(min(step, max(len(live), 1)) * bs)
            for _ in range(min(len(parts), AHEAD + 1) or 1)]
    bad: List[Tuple[int, int]] = []
    unreadable: List[Tuple[int, int]] = []
    progress = Progress(show)
    progress.add(len(parts))

    def read(k: int) -> List[bool]:
        part, view = parts[k], bufs[k % len(bufs)][:len(parts[k]) * bs]
        try:
            o.disk.read_blocks([s for _, s, _, _ in part], view)
            return [True] * len(part)
        except OSError:  # a device error: find the blocks that cannot be read
            ok = []
            for j, (_, s, _, _) in enumerate(part):
                try:
                    o.disk.read_blocks([s], view[j * bs:(j + 1) * bs])
                    ok.append(True)
                except OSError:
                    ok.append(False)
            return ok

    with concurrent.futures.ThreadPoolExecutor(AHEAD, thread_name_prefix="dynblock-verify") as pool:
        reads = [pool.submit(read, k) for k in range(min(AHEAD, len(parts)))]
        done = 0
        for k, part in enumerate(parts):
            ok = reads[k].result()
            if k + AHEAD < len(parts):
                reads.append(pool.submit(read, k + AHEAD))
            unreadable += [(h, ns) for (h, _, _, ns), r in zip(part, ok) if not r]
            if checksums:
                view = bufs[k % len(bufs)][:len(part) * bs]
                got = _core.block_crcs([h for h, _, _, _ in part], view, bs)
                bad += [(h, ns) for (h, _, c, ns), g, r in zip(part, got, ok) if r and g != c]
            done += len(part)
            progress.step(f"{done}/{len(live)} blocks read")
    progress.close()
    return bad, unreadable


def verify(path: str, drop_bad: bool = False, show: bool = False) -> Dict[str, Any]:
    d = info(path, who=False)
    o = _Open(path, d)
    try:
        # Re-read the index now that the store is ours (opening may have
        # rewritten it without damaged records).
        now = _core.inspect_store(path)
        live, names = now["live"], now["namespaces"]
        bad, unreadable = _check(o, live, bool(d["checksums"]), show)
        dropped = 0
        if drop_bad and (bad or unreadable):
            by_ns: Dict[int, List[int]] = {}
            for h, ns in bad + unreadable:
                by_ns.setdefault(ns, []).append(h)
            for ns, hashes in by_ns.items():
                if ns == 0 or (ns <= len(names) and names[ns - 1]):
                    dropped += o.m.remove(hashes, names[ns - 1] if ns else None)
            o.m.compact_index()
    finally:
        o.close()

    def name(ns: int) -> Optional[str]:
        return None if ns == 0 else names[ns - 1] if ns <= len(names) and names[ns - 1] else f"#{ns}"

    return {"path": d["path"], "checked": len(live), "checksums": bool(d["checksums"]),
            "bad": [h for h, _ in bad], "unreadable": [h for h, _ in unreadable],
            # The namespace of each (None: the shared one), in the same order.
            "bad_namespaces": [name(ns) for _, ns in bad],
            "unreadable_namespaces": [name(ns) for _, ns in unreadable],
            "dropped": dropped,
            "ok": not (bad or unreadable) or dropped == len(bad) + len(unreadable)}


def compact(path: str) -> Dict[str, Any]:
    d = info(path, who=False)
    o = _Open(path, d)
    try:
        o.m.compact_index()
    finally:
        o.close()
    after = info(path, who=False)
    return {"path": d["path"], "records_before": d["index_records"],
            "records_after": after["index_records"], "blocks": after["blocks"]}


def clear(path: str) -> Dict[str, Any]:
    d = info(path, who=False)
    o = _Open(path, d)
    try:
        n = len(o.m)
        o.m.clear()
        o.m.compact_index()
    finally:
        o.close()
    return {"path": d["path"], "removed": n, "blocks": info(path, who=False)["blocks"]}


def purge(path: str, namespace: str, remote: bool = False, timeout: float = 30.0,
          env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Remove namespace ``namespace``'s blocks from the store; with
    ``remote``, then its keys on the remote tier ``env`` (default: the
    process's environment) names. Raises :class:`Refused` before anything
    changes when the store or the remote settings cannot be used."""
    from .manager import _namespace

    try:
        if _namespace(namespace) is None:
            raise ValueError("purge needs a namespace, got None")
    except (TypeError, ValueError) as e:
        raise Refused(f"--namespace: {e}") from None
    d = info(path, who=False)
    tier = None
    if remote:
        tier = _remote_tier(d, os.environ if env is None else env)
    try:
        o = _Open(path, d)
        try:
            n = o.m.purge(namespace)
        finally:
            o.close()
        out: Dict[str, Any] = {"path": d["path"], "namespace": namespace, "removed": n,
                               "blocks": info(path, who=False)["blocks"]}
        if tier is not None:
            out["remote"] = tier.url
            try:
                out["remote_deleted"] = tier.purge(namespace, float(timeout))
                out["remote_error"] = None
            except _core.RemoteError as e:
                out["remote_deleted"] = None
                out["remote_error"] = str(e)
        return out
    finally:
        if tier is not None:
            tier.close(0.0)


def _remote_tier(d: Dict[str, Any], env: Mapping[str, str]) -> "_core.RemoteTier":
    """The remote tier ``env`` names, for the store ``d`` describes (its
    block size and layout fingerprint)."""
    from .config import Config, EnvError

    if not env.get("DYNBLOCK_REMOTE_URL"):
        raise Refused("--remote needs DYNBLOCK_REMOTE_URL (and DYNBLOCK_REMOTE_PREFIX / "
                      "DYNBLOCK_REMOTE_SECRET as the engine has them)")
    bs = int(d["index_block_size"])
    try:
        c = Config.from_env(env, block_size=bs, layout=None, host_blocks=1)
        assert c.remote is not None  # DYNBLOCK_REMOTE_URL is set
        return _core.RemoteTier(c.remote, bs, prefix=c.remote_prefix,
                                timeout_ms=c.remote_timeout_ms, ca_file=c.remote_ca_file,
                                layout=int(d["layout"]), secret=c.remote_secret)
    except (EnvError, ValueError, TypeError, _core.RemoteError) as e:
        raise Refused(str(e)) from None


def _size(n: int) -> str:
    for unit, m in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= m:
            return f"{n / m:.1f} {unit}"
    return f"{n} B"


def _when(t: Optional[int]) -> str:
    if not t:
        return "not recorded"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _closed(d: Dict[str, Any]) -> str:
    if d["last_opened"] is None and d["last_closed_cleanly"] is None:
        return "not recorded (an index written before open and close markers)"
    if d["closed_cleanly"]:
        return f"yes, at {_when(d['last_closed_cleanly'])}"
    last = d["last_closed_cleanly"]
    return ("no: not closed cleanly since it was last opened (open now, or its process died)"
            + (f"; before that at {_when(last)}" if last else ""))


def _namespaces(d: Dict[str, Any]) -> str:
    per = d["namespace_blocks"]
    if not d["namespaces"]:
        return "none (every block is in the shared namespace)"
    shown = ", ".join(f"{n!r}: {per.get(n, 0)}" for n in d["namespaces"][:5])
    more = len(d["namespaces"]) - 5
    return f"{len(d['namespaces'])} ({shown}{f', {more} more' if more > 0 else ''}; blocks each)"


def _print_info(d: Dict[str, Any]) -> None:
    held = d["held_by"]
    rows = [
        ("store", d["path"]),
        ("store id", str(d.get("store_id")) + ("" if d["index_matches_data"] else
                                               f" (index: {d['index_store_id']}: MISMATCH)")),
        ("block size", f"{d['index_block_size']} bytes"),
        ("slots", f"{d['index_num_blocks']}"),
        ("blocks stored", f"{d['blocks']} ({d['fill']:.1%} full, {_size(d['stored_bytes'])})"),
        ("namespaces", _namespaces(d)),
        ("data file", f"{_size(d['data_file_bytes'])} ({_size(d['data_file_allocated_bytes'])} allocated)"),
        ("index", f"{d['index_records']} records, {d['index_bad_records']} damaged, "
                  f"{d['index_torn_bytes']} torn bytes ({_size(d['index_bytes'])})"),
        ("turned away", f"{d['turned_away_remembered']} blocks remembered by disk_admission='reuse'"),
        ("last opened", _when(d["last_opened"])),
        ("closed cleanly", _closed(d)),
        ("checksums", "on" if d["checksums"] else "off"),
        ("layout fingerprint", f"{d['layout']:#x}"),
        ("held by", "nobody" if held is None else f"process {held['pid']} ({held['command']})"),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(w)}  {v}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynblock.store", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="the store's data file (its index is PATH.index)")
    p.add_argument("command", choices=("info", "verify", "compact", "clear", "purge"))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--drop-bad", action="store_true",
                   help="verify: remove the blocks that fail their check")
    p.add_argument("--namespace", help="purge: the namespace whose blocks go")
    p.add_argument("--remote", action="store_true",
                   help="purge: also delete its keys on the remote tier DYNBLOCK_REMOTE_URL names")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="purge --remote: seconds the remote purge may take (default 30)")
    a = p.parse_args(argv)
    if a.drop_bad and a.command != "verify":
        p.error("--drop-bad goes with verify")
    if a.command == "purge" and a.namespace is None:
        p.error("purge needs --namespace NAME")
    if a.command != "purge" and (a.namespace is not None or a.remote):
        p.error("--namespace and --remote go with purge")
    if not (a.timeout > 0 and a.timeout < float("inf")):
        p.error(f"--timeout must be a number of seconds > 0, got {a.timeout}")
    try:
        if a.command == "info":
            out = info(a.path)
        elif a.command == "verify":
            out = verify(a.path, a.drop_bad, show=not a.json and sys.stderr.isatty())
        elif a.command == "compact":
            out = compact(a.path)
        elif a.command == "purge":
            out = purge(a.path, a.namespace, a.remote, a.timeout)
        else:
            out = clear(a.path)
    except Refused as e:
        print(f"dynblock.store: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(out, indent=2))
    elif a.command == "info":
        _print_info(out)
    elif a.command == "verify":
        what = "checked against their checksums" if out["checksums"] else \
            "read (the store has no checksums)"
        print(f"{out['checked']} blocks {what}: {len(out['bad'])} failed their checksum, "
              f"{len(out['unreadable'])} could not be read"
              + (f"; {out['dropped']} removed" if a.drop_bad else ""))
        failed = zip(out["bad"] + out["unreadable"], out["bad_namespaces"] + out["unreadable_namespaces"])
        for h, ns in list(failed)[:20]:
            print(f"  block {h:#018x}" + ("" if ns is None else f" (namespace {ns!r})"))
    elif a.command == "compact":
        print(f"index rewritten: {out['records_before']} records -> {out['records_after']} "
              f"({out['blocks']} blocks)")
    elif a.command == "purge":
        print(f"removed {out['removed']} blocks of namespace {out['namespace']!r}; "
              f"{out['blocks']} left")
        if "remote" in out:
            if out["remote_error"] is None:
                print(f"deleted {out['remote_deleted']} keys of namespace {out['namespace']!r} "
                      f"on {out['remote']}")
            else:
                print(f"dynblock.store: {out['remote_error']}", file=sys.stderr)
    else:
        print(f"removed {out['removed']} blocks; {out['blocks']} left")
    if a.command == "verify" and not out["ok"]:
        return 1
    if a.command == "purge" and out.get("remote_error"):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
