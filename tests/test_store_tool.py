"""``python -m dynblock.store``: info, verify (and --drop-bad), compact and clear on real
persistent stores, run as a real subprocess; refused while another process holds the store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from conftest import shim_env
from dynblock import _core
from test_durability import BS, blocks, data_for, open_store


def tool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dynblock.store", *args], capture_output=True,
                          text=True, timeout=timeout)


def make_store(path: Path, hs: list) -> None:
    with open_store(path, disk_blocks=32) as m:
        assert m.put(hs, blocks(hs)) == len(hs)


def test_info_reports_geometry_blocks_and_records(tmp_path: Path) -> None:
    path = tmp_path / "kv"
    make_store(path, [1, 2, 3, 4])
    with open_store(path, disk_blocks=32) as m:
        m.remove([2])
    r = tool(str(path), "info", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["block_size"], d["index_num_blocks"], d["blocks"]) == (BS, 32, 3)
    assert d["stored_bytes"] == 3 * BS and d["index_matches_data"] and d["held_by"] is None
    # Two sessions: open marker, 4 PUTs, close marker; open marker, 1 DEL, close marker.
    assert d["index_records"] == 9 and d["index_bad_records"] == 0
    assert d["closed_cleanly"] is True and d["last_closed_cleanly"] >= d["last_opened"] > 0
    assert len(d["store_id"]) == 32 and d["checksums"] is True
    text = tool(str(path), "info")
    assert text.returncode == 0 and "blocks stored       3" in text.stdout, text.stdout


def test_verify_finds_a_changed_block_and_drop_bad_removes_it(tmp_path: Path) -> None:
    path = tmp_path / "kv"
    make_store(path, [1, 2, 3])
    d = _core.inspect_store(str(path))
    slot = {h: s for h, s, _, _ in d["live"]}[2]
    with open(path, "r+b") as f:  # one byte of block 2 changes on disk
        f.seek(d["data_offset"] + slot * d["slot_stride"] + 100)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    r = tool(str(path), "verify", "--json")
    assert r.returncode == 1, r.stderr
    out = json.loads(r.stdout)
    assert out["checked"] == 3 and out["bad"] == [2] and out["dropped"] == 0
    assert tool(str(path), "info", "--json").returncode == 0
    assert json.loads(tool(str(path), "info", "--json").stdout)["blocks"] == 3  # kept
    r = tool(str(path), "verify", "--drop-bad")
    assert r.returncode == 0, r.stderr
    assert "1 failed their checksum" in r.stdout and "1 removed" in r.stdout
    with open_store(path, disk_blocks=32) as m:
        assert 2 not in m and len(m) == 2
        out_buf = np.zeros(BS, np.uint8)
        assert m.get([3], out_buf) == 1 and np.array_equal(out_buf, data_for(3))


def test_info_and_verify_know_namespaces(tmp_path: Path) -> None:
    """Hash 2 is stored in the shared namespace and in "tenant a"; the tenant's copy is
    damaged: info counts blocks per namespace, verify names the namespace of the bad block,
    and --drop-bad removes that block only, not the shared one of the same hash."""
    path = tmp_path / "kv"
    with open_store(path, disk_blocks=32) as m:
        m.put([1, 2], blocks([1, 2]))
        m.put([2, 3], blocks([7, 8]), namespace="tenant a")
    d = _core.inspect_store(str(path))
    assert d["namespaces"] == ["tenant a"]
    slot = {(h, ns): s for h, s, _, ns in d["live"]}[(2, 1)]
    with open(path, "r+b") as f:
        f.seek(d["data_offset"] + slot * d["slot_stride"] + 7)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x01]))
    info = json.loads(tool(str(path), "info", "--json").stdout)
    assert info["blocks"] == 4 and info["namespace_blocks"] == {"tenant a": 2}
    assert "namespaces          1 ('tenant a': 2; blocks each)" in tool(str(path), "info").stdout
    r = tool(str(path), "verify", "--json")
    out = json.loads(r.stdout)
    assert r.returncode == 1 and (out["bad"], out["bad_namespaces"]) == ([2], ["tenant a"])
    r = tool(str(path), "verify", "--drop-bad")
    assert r.returncode == 0 and "(namespace 'tenant a')" in r.stdout, r.stdout
    with open_store(path, disk_blocks=32) as m:
        assert 2 in m and not m.contains(2, namespace="tenant a") and len(m) == 3
        out_buf = np.zeros(BS, np.uint8)
        assert m.get([2], out_buf) == 1 and np.array_equal(out_buf, data_for(2))


def test_verify_names_a_block_the_device_cannot_read(tmp_path: Path, faultshim: Path) -> None:
    path = tmp_path / "kv"
    make_store(path, [1, 2, 3])
    d = _core.inspect_store(str(path))
    at = d["data_offset"] + {h: s for h, s, _, _ in d["live"]}[2] * d["slot_stride"]
    env = dict(os.environ, **shim_env(faultshim, suffix="/kv", op="read", count=-1,
                                      off_lo=at, off_hi=at + d["slot_stride"]))
    r = subprocess.run([sys.executable, "-m", "dynblock.store", str(path), "verify", "--json"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1, r.stderr
    out = json.loads(r.stdout)
    assert (out["checked"], out["bad"], out["unreadable"]) == (3, [], [2])


def test_compact_and_clear(tmp_path: Path) -> None:
    path = tmp_path / "kv"
    make_store(path, [1, 2, 3, 4])
    with open_store(path, disk_blocks=32) as m:
        m.remove([1, 2])
    r = tool(str(path), "compact", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    # Before: 2 sessions of markers, 4 PUTs, 2 DELs; after: 2 PUTs and the tool's own markers.
    assert (out["records_before"], out["records_after"], out["blocks"]) == (10, 4, 2)
    r = tool(str(path), "clear", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"path": str(path), "removed": 2, "blocks": 0}
    with open_store(path, disk_blocks=32) as m:
        assert len(m) == 0


def _ns_store(path: Path, **kw) -> None:
    """Blocks 1, 2 shared; 1, 2, 3 in "t1"; 5 in "t2"."""
    with open_store(path, disk_blocks=32, **kw) as m:
        assert m.put([1, 2], blocks([1, 2])) == 2
        assert m.put([1, 2, 3], blocks([11, 12, 13]), namespace="t1") == 3
        assert m.put([5], blocks([5]), namespace="t2") == 1


def test_purge_removes_one_namespace(tmp_path: Path) -> None:
    path = tmp_path / "kv"
    _ns_store(path)
    r = tool(str(path), "purge", "--namespace", "t1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"path": str(path), "namespace": "t1", "removed": 3,
                                    "blocks": 3}
    r = tool(str(path), "purge", "--namespace", "t2")
    assert r.returncode == 0 and "removed 1 blocks of namespace 't2'; 2 left" in r.stdout, r
    with open_store(path, disk_blocks=32) as m:
        assert m.match([1, 2, 3], namespace="t1") == 0 and m.match([5], namespace="t2") == 0
        out = np.zeros(2 * BS, np.uint8)
        assert m.get([1, 2], out) == 2 and np.array_equal(out, blocks([1, 2]))
        assert set(m.namespaces()) == {"t1", "t2"}  # the names stay known
    for args, says in ((["purge"], "purge needs --namespace NAME"),
                       (["info", "--namespace", "t1"], "--namespace and --remote go with purge"),
                       (["purge", "--namespace", "t1", "--timeout", "0"], "--timeout must be"),
                       (["purge", "--namespace", ""], "non-empty"),
                       (["purge", "--namespace", "x" * 2000], "at most 1024 bytes")):
        r = tool(str(path), *args)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, \
            (args, r.stderr)


def test_purge_remote_deletes_the_namespace_on_the_server(tmp_path: Path) -> None:
    from redis_servers import Server, need

    need("redis-server")
    srv = Server(tmp_path / "redis", [], kind="redis")
    try:
        url = f"redis://127.0.0.1:{srv.port}"
        path = tmp_path / "kv"
        _ns_store(path, remote=url, remote_write="sync", remote_secret="s3")
        assert len(srv.cli("KEYS", "*").split()) == 6
        env = {k: v for k, v in os.environ.items() if not k.startswith("DYNBLOCK_")}
        # Without the URL nothing changes: refused before the store is opened.
        r = subprocess.run([sys.executable, "-m", "dynblock.store", str(path), "purge",
                            "--namespace", "t1", "--remote"], capture_output=True, text=True,
                           timeout=120, env=env)
        assert r.returncode == 2 and "needs DYNBLOCK_REMOTE_URL" in r.stderr, r.stderr
        assert json.loads(tool(str(path), "info", "--json").stdout)["blocks"] == 6
        env.update(DYNBLOCK_REMOTE_URL=url, DYNBLOCK_REMOTE_SECRET="s3")
        r = subprocess.run([sys.executable, "-m", "dynblock.store", str(path), "purge",
                            "--namespace", "t1", "--remote"], capture_output=True, text=True,
                           timeout=120, env=env)
        assert r.returncode == 0, r.stderr
        assert "removed 3 blocks" in r.stdout and "deleted 3 keys" in r.stdout, r.stdout
        keys = srv.cli("KEYS", "*").split()
        assert len(keys) == 3  # the shared namespace's two, t2's one
        with open_store(path, disk_blocks=32, remote=url, remote_secret="s3") as m:
            assert m.match([1, 2, 3], namespace="t1") == 0  # neither the store nor the server
            assert m.match([5], namespace="t2") == 1 and m.match([1, 2]) == 2
        # A user the server's ACL denies SCAN: the local purge is done, the remote one says
        # why (exit status 1) and the server keeps the key.
        srv.cli("ACL", "SETUSER", "noscan", "on", ">pw9", "~*", "+@all", "-scan")
        env["DYNBLOCK_REMOTE_URL"] = f"redis://noscan:pw9@127.0.0.1:{srv.port}"
        r = subprocess.run([sys.executable, "-m", "dynblock.store", str(path), "purge",
                            "--namespace", "t2", "--remote"], capture_output=True, text=True,
                           timeout=120, env=env)
        assert r.returncode == 1 and "removed 1 blocks" in r.stdout, (r.stdout, r.stderr)
        assert "refused SCAN" in r.stderr and "pw9" not in r.stderr + r.stdout, r.stderr
        assert len(srv.cli("KEYS", "*").split()) == 3
        srv.stop()  # a server that is gone: refused before the store is opened
        r = subprocess.run([sys.executable, "-m", "dynblock.store", str(path), "purge",
                            "--namespace", "t1", "--remote"], capture_output=True, text=True,
                           timeout=120, env=env)
        assert r.returncode == 2 and "remote" in r.stderr and "pw9" not in r.stderr, r.stderr
        assert json.loads(tool(str(path), "info", "--json").stdout)["blocks"] == 2
    finally:
        srv.stop()


def test_writers_are_refused_naming_the_process_that_holds_the_store(tmp_path: Path) -> None:
    path = tmp_path / "kv"
    make_store(path, [1, 2])
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time, dynblock
        m = dynblock.BlockManager.open({str(path)!r}, block_size={BS}, disk_blocks=32,
                                       numa_node=None, pin=False)
        print("open", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        for cmd in ("verify", "compact", "clear", "purge --namespace t"):
            r = tool(str(path), *cmd.split())
            assert r.returncode == 2, (cmd, r.stdout, r.stderr)
            assert f"held by process {holder.pid}" in r.stderr and "python" in r.stderr, r.stderr
        d = json.loads(tool(str(path), "info", "--json").stdout)  # info only reads: it works
        assert d["held_by"]["pid"] == holder.pid and d["blocks"] == 2
        assert d["closed_cleanly"] is False and d["last_opened"] >= d["last_closed_cleanly"]
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    assert tool(str(path), "verify").returncode == 0  # free again


def test_a_store_killed_while_open_was_not_closed_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "kv"
    make_store(path, [1])
    script = textwrap.dedent(f"""
        import os, signal, numpy as np, dynblock
        m = dynblock.BlockManager.open({str(path)!r}, block_size={BS}, disk_blocks=32,
                                       numa_node=None, pin=False)
        m.put([2], np.zeros({BS}, np.uint8))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert r.returncode == -9, r.stderr
    d = json.loads(tool(str(path), "info", "--json").stdout)
    assert d["closed_cleanly"] is False and d["blocks"] == 2
    assert d["last_opened"] >= d["last_closed_cleanly"] > 0
    assert "not closed cleanly" in tool(str(path), "info").stdout
    with open_store(path, disk_blocks=32):
        pass
    assert json.loads(tool(str(path), "info", "--json").stdout)["closed_cleanly"] is True


def test_bad_input_is_refused_clearly(tmp_path: Path) -> None:
    r = tool(str(tmp_path / "missing"), "info")
    assert r.returncode == 2 and "is not a file" in r.stderr
    plain = tmp_path / "plain"
    plain.write_bytes(b"not a store")
    r = tool(str(plain), "info")
    assert r.returncode == 2 and "plain.index is missing" in r.stderr
    (tmp_path / "plain.index").write_bytes(b"x" * 100)
    r = tool(str(plain), "verify")
    assert r.returncode == 2 and "not" in r.stderr and "Traceback" not in r.stderr
    r = tool(str(plain), "info", "--drop-bad")
    assert r.returncode == 2 and "--drop-bad goes with verify" in r.stderr


WRITER = """
import sys, numpy as np, dynblock
bs = {bs}
def data_for(h):
    return np.random.default_rng(h).integers(0, 256, size=bs, dtype=np.uint8)
m = dynblock.BlockManager.open({path!r}, block_size=bs, disk_blocks=4, host_blocks=0,
                               numa_node=None, pin=False, checksums={checksums})
for line in sys.stdin:  # "put H...": store blocks; each answered "ok"
    hs = [int(x) for x in line.split()[1:]]
    m.put(hs, np.concatenate([data_for(h) for h in hs]))
    print("ok", flush=True)
m.close()
"""


class _Writer:
    """A writer process holding a persistent store of 4 blocks open."""

    def __init__(self, path: Path, checksums: bool = True) -> None:
        self.p = subprocess.Popen([sys.executable, "-c", WRITER.format(bs=BS, path=str(path),
                                                                       checksums=checksums)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def put(self, *hs: int) -> None:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write("put " + " ".join(map(str, hs)) + "\n")
        self.p.stdin.flush()
        assert self.p.stdout.readline().strip() == "ok"

    def close(self) -> None:
        assert self.p.stdin is not None
        self.p.stdin.close()
        self.p.wait(timeout=30)


def test_a_reader_follows_the_store_another_process_writes(tmp_path: Path) -> None:
    from dynblock.store import Reader

    path = tmp_path / "kv"
    r = Reader(str(path), BS)
    assert r.match([1]) == 0  # nothing created yet: a miss, not an error
    w = _Writer(path)
    try:
        w.put(1, 2, 3)
        assert r.match([1, 2, 3, 4]) == 3  # the miss re-reads the writer's index
        dst = np.zeros(4 * BS, np.uint8)
        assert r.get_each([3, 1, 2], dst, [0, 2, 3]) == [True, True, True]
        assert (dst[:BS] == data_for(3)).all() and (dst[2 * BS:3 * BS] == data_for(1)).all()
        # The writer evicts 1-3 for 4-7 (4 slots) while the reader's view is the old one:
        # reading an evicted block finds another block's bytes there, which fail its check.
        w.put(4, 5, 6, 7)
        dst[:] = 0
        assert r.get_each([1, 2, 3], dst, [0, 1, 2]) == [False, False, False]
        assert r.failed == 3  # (those rows' bytes are unspecified, as for BlockManager.get)
        assert r.match([4, 5, 6, 7]) == 4 and r.match([1]) == 0
        assert r.get_each([5], dst, [3]) == [True] and (dst[3 * BS:] == data_for(5)).all()
    finally:
        w.close()
    r.close()


def test_a_reader_refuses_what_it_cannot_check(tmp_path: Path) -> None:
    import pytest

    from dynblock.store import Reader

    path = tmp_path / "kv"
    w = _Writer(path, checksums=False)
    try:
        w.put(1)
        with pytest.raises(ValueError, match="without checksums"):
            Reader(str(path), BS)
    finally:
        w.close()
    make_store(tmp_path / "kv2", [1])
    with pytest.raises(ValueError, match=f"blocks of {BS} bytes, this reader expects {2 * BS}"):
        Reader(str(tmp_path / "kv2"), 2 * BS)
