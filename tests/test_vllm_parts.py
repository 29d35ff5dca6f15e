"""The parts of dynblock.vllm that need no vLLM: keys, the lookup service over a
real Unix socket, and LayerStore (leases per request, rows, staging)."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dynblock import Config
from dynblock.vllm import LayerStore, block_key, socket_path
from dynblock.vllm.keys import runtime_dir
from dynblock.vllm.service import LookupClient, LookupServer
from dynblock.vllm.store import row_view, split_extra_config

H = [bytes([i]) * 32 for i in range(1, 9)]  # vLLM-style 32-byte block hashes
ROW = (2, 4, 8)  # K/V x 4 tokens x 8 floats: 256 bytes of float32


def layer_store(tmp_path: Path, layers: int = 2, host: int = 16, disk: int = 0, **kw) -> LayerStore:
    layout = LayerStore.layout_for(layers, 4, ROW, "float32")
    cfg = Config(layout=layout, host_blocks=host, disk_blocks=disk, disk_dir=str(tmp_path),
                 numa_node=None, pin=False, **kw)
    return LayerStore(cfg)


def kv_tensor(n_blocks: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n_blocks,) + ROW, dtype=np.float32)


def test_block_keys_separate_layers_models_and_hashes() -> None:
    k = block_key(H[0], 0, 7)
    assert k == block_key(H[0], 0, 7) and 0 <= k < 2**64
    others = {block_key(H[0], 1, 7), block_key(H[0], 0, 8), block_key(H[1], 0, 7)}
    assert k not in others and len(others) == 3
    with pytest.raises(TypeError, match="block_hash must be bytes"):
        block_key("abc", 0, 7)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layer"):
        block_key(H[0], -1, 7)


def test_socket_paths_are_private_and_per_engine_and_rank(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    p = socket_path("engine-a", 0)
    assert p == socket_path("engine-a", 0) and p.startswith(str(tmp_path / "dynblock"))
    assert len({p, socket_path("engine-a", 1), socket_path("engine-b", 0)}) == 3
    assert len(p.encode()) < 108
    assert stat.S_IMODE(os.stat(runtime_dir()).st_mode) == 0o700
    os.chmod(runtime_dir(), 0o777)
    with pytest.raises(PermissionError, match="only its owner may write"):
        runtime_dir()
    # Refused as a directory, so the socket is an abstract one (both ends check SO_PEERCRED).
    q = socket_path("engine-a", 0)
    assert q.startswith("\0dynblock-") and q == socket_path("engine-a", 0)
    assert q != socket_path("engine-a", 1)


def test_extra_config_is_split_and_checked() -> None:
    cfg, opts = split_extra_config({"host_bytes": 1 << 20, "lookup_timeout_ms": 5})
    assert cfg == {"host_bytes": 1 << 20} and opts["lookup_timeout_ms"] == 5
    with pytest.raises(ValueError, match="'colour'.*neither a dynblock.Config field"):
        split_extra_config({"colour": "blue"})
    with pytest.raises(ValueError, match="derives block_size"):
        split_extra_config({"block_size": 4096})


def test_save_then_lease_and_load_every_layer_at_rows(tmp_path: Path) -> None:
    st = layer_store(tmp_path, disk=16)
    src = [kv_tensor(8, 1), kv_tensor(8, 2)]
    for layer in range(2):
        assert st.save(layer, H[:4], src[layer], [5, 1, 7, 2], True).wait(30) == 4
    assert st.lookup("req", H[:6]) == 4  # the 4 stored of 6
    held = st.take("req")
    assert held is not None and held.count == 4 and st.take("req") is None
    dst = [np.zeros_like(src[0]), np.zeros_like(src[1])]
    for layer in range(2):
        assert st.load(layer, held.leases[layer], dst[layer], [0, 3, 4, 6], True).wait(30) == [True] * 4
        assert np.array_equal(dst[layer][[0, 3, 4, 6]], src[layer][[5, 1, 7, 2]])
    # without a lease: by hashes
    out = np.zeros_like(src[1])
    assert st.load(1, H[:2], out, [2, 3], True).wait(30) == [True, True]
    assert np.array_equal(out[2], src[1][5])
    st.close()


def test_a_prefix_counts_only_where_every_layer_has_it(tmp_path: Path) -> None:
    st = layer_store(tmp_path)
    t = kv_tensor(8, 3)
    st.save(0, H[:4], t, [0, 1, 2, 3], True).wait(30)
    st.save(1, H[:2], t, [0, 1], True).wait(30)  # layer 1 lacks blocks 2 and 3
    assert st.lookup("r", H[:4]) == 2
    assert st.kv.stats()["leases"] >= 2
    assert st.release("r") and not st.release("r")
    assert st.lookup("r", [H[5]]) == 0 and st.take("r") is None
    st.close()


def test_leases_hold_blocks_against_eviction_until_released_or_expired(tmp_path: Path) -> None:
    st = layer_store(tmp_path, layers=1, host=4)
    t = kv_tensor(8, 4)
    st.save(0, H[:2], t, [0, 1], True).wait(30)
    assert st.lookup("a", H[:2]) == 2
    st.save(0, H[2:8], t, [2, 3, 4, 5, 6, 7], True).wait(30)  # wants all 4 slots
    assert st.kv.match(st.keys(H[:2], 0)) == 2  # leased: still there
    assert len(st.kv) == 4  # the batch filled only the 2 unleased slots
    # a lease nobody loads expires at the next lookup after its TTL
    st.lease_ttl_s = 0.0
    time.sleep(0.01)
    st.lookup("b", [H[7]])
    assert st.take("a") is None
    st.close()


def test_staging_path_for_tensors_that_are_not_rows(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    st = layer_store(tmp_path, layers=1)
    # blocks in dimension 1 (like K/V-outermost GPU layouts): not row-addressable
    full = torch.rand((2, 8, 4, 8), dtype=torch.float32)
    zc, bd, why = row_view(full, 8)
    assert not zc and bd == 1 and "not the outermost" in why
    assert st.save(0, H[:3], full, [6, 0, 3], zc, bd).wait(30) == 3
    out = torch.zeros_like(full)
    job = st.load(0, H[:3], out, [1, 2, 5], zc, bd)
    assert job.wait(30) == [True, True, True]
    for src_row, dst_row in zip([6, 0, 3], [1, 2, 5]):
        assert torch.equal(out[:, dst_row], full[:, src_row])
    assert torch.count_nonzero(out[:, [0, 3, 4, 6, 7]]) == 0
    assert row_view(torch.zeros((8, 2, 4, 8)), 8)[0]
    assert not row_view(torch.zeros((8, 2, 4, 8)).transpose(2, 3), 8)[0]
    with pytest.raises(ValueError, match="no dimension"):
        row_view(torch.zeros((3, 3)), 8)
    st.close()


def test_a_tenants_blocks_are_its_own_through_the_lookup_service(tmp_path: Path) -> None:
    """Blocks saved with a namespace (a request's cache_salt) are found by a lookup over
    the service in that namespace only, and loaded from it."""
    from dynblock.vllm.service import decode_request, encode_lookup

    st = layer_store(tmp_path)
    t, u = kv_tensor(8, 5), kv_tensor(8, 6)
    for layer in range(2):
        st.save(layer, H[:3], t, [0, 1, 2], True, namespace="tenant-1").wait(30)
        st.save(layer, H[:1], u, [4], True).wait(30)
    path = str(tmp_path / "s.sock")
    srv = LookupServer(path, st.lookup, st.release)
    cli = LookupClient(path, timeout=5, retry_s=0.0)
    try:
        assert cli.lookup("a", H[:3], "tenant-1") == 3
        assert cli.lookup("b", H[:3]) == 1 and cli.lookup("c", H[:3], "tenant-2") == 0
        held = st.take("a")
        assert held is not None and held.leases[0].namespace == "tenant-1"
        out = np.zeros_like(t)
        assert st.load(0, held.leases[0], out, [5, 6, 7], True, hashes=H[:3]).wait(30) == [True] * 3
        assert np.array_equal(out[5:8], t[0:3])
        assert st.load(1, H[:1], out, [0], True, namespace="tenant-1").wait(30) == [True]
        assert np.array_equal(out[0], t[0])
        assert st.kv.namespaces() == ["tenant-1"]
    finally:
        cli.close()
        srv.close()
        st.close()
    # The frame carries the namespace; a frame whose namespace length lies is refused.
    frame = encode_lookup("r", H[:2], 0.05, "tenant-1")
    assert decode_request(frame)[4] == "tenant-1" and decode_request(encode_lookup("r", H[:2]))[4] is None
    with pytest.raises(ValueError, match="namespace"):
        decode_request(frame[:-1])
    with pytest.raises(ValueError, match="namespace is 1 to 1024 bytes"):
        encode_lookup("r", H[:1], 0.05, "x" * 1025)


def test_lookup_service_over_a_real_socket(tmp_path: Path) -> None:
    st = layer_store(tmp_path)
    t = kv_tensor(8, 5)
    for layer in range(2):
        st.save(layer, H[:3], t, [0, 1, 2], True).wait(30)
    path = str(tmp_path / "s.sock")
    srv = LookupServer(path, st.lookup, st.release)
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0
    cli = LookupClient(path, timeout=5, retry_s=0.0)
    assert cli.lookup("req", H[:5]) == 3
    assert st.take("req") is not None  # the lease lives in the store's process
    assert cli.lookup("req2", H[:1]) == 1
    cli.release("req2")
    assert st.take("req2") is None
    assert cli.lookup("x", []) == 0
    with pytest.raises(RuntimeError, match="already serves"):
        LookupServer(path, st.lookup, st.release)
    srv.close()
    assert not os.path.exists(path)
    # the service is gone: no hit, no hang, one error counted
    assert cli.lookup("req3", H[:3]) == 0
    # a stale socket file from a dead process is replaced
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()
    srv = LookupServer(path, st.lookup, st.release)
    assert cli.lookup("req4", H[:3]) == 3  # reconnected by itself
    srv.close()
    cli.close()
    st.close()


def test_a_slow_or_silent_service_is_no_hit_not_a_hang(tmp_path: Path) -> None:
    gate = threading.Event()

    def slow_lookup(req_id: str, hashes: list, timeout: object = None) -> int:
        gate.wait(10)
        return len(hashes)

    path = str(tmp_path / "slow.sock")
    srv = LookupServer(path, slow_lookup, lambda r: False)
    cli = LookupClient(path, timeout=0.05, retry_s=0.0)
    result: list = []
    th = threading.Thread(target=lambda: result.append(cli.lookup("r", H[:2])))
    th.start()
    th.join(timeout=5)
    assert not th.is_alive() and result == [0] and cli.errors == 1
    gate.set()  # the late answer must not be read as the next call's
    srv.close()
    srv = LookupServer(path, lambda r, h, timeout=None: 1, lambda r: False)
    assert cli.lookup("r2", H[:2]) == 1
    srv.close()
    # a peer that sends garbage gets "no hit", and the service goes on
    srv = LookupServer(path, lambda r, h, timeout=None: len(h), lambda r: False)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall((5).to_bytes(4, "little") + b"\x09abcd")
    assert s.recv(8) == (4).to_bytes(4, "little") + (0).to_bytes(4, "little")
    s.close()
    assert LookupClient(path, timeout=5).lookup("ok", H[:2]) == 2
    srv.close()


def test_the_readme_vllm_configs_are_valid(tmp_path: Path, monkeypatch) -> None:
    # The README's two vLLM configs: every extra key is a Config field or an option, and the
    # sizes make a valid Config once the connector adds the block size.
    import re
    import sys
    import types


    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "vllm" in b]
    assert len(blocks) == 2
    seen: dict = {}
    fake = types.ModuleType("vllm")
    fake.LLM = lambda **kw: seen.update(kw)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", fake)
    ns: dict = {}
    for code in blocks:
        exec(compile(code.replace("/nvme", str(tmp_path)), "README.md", "exec"), ns)
    conn = seen["kv_transfer_config"]
    assert conn["kv_connector_module_path"] == "dynblock.vllm"
    import dynblock.vllm as dv

    assert conn["kv_connector"] in dv.__all__
    fields, _ = split_extra_config(conn["kv_connector_extra_config"])
    Config(block_size=4096, **fields)
    tier = ns["kv_transfer_config"]["kv_connector_extra_config"]["secondary_tiers"][0]
    assert tier["type"] in dv.__all__ and tier["module_path"] == "dynblock.vllm"
    fields, _ = split_extra_config({k: v for k, v in tier.items() if k not in ("type", "module_path")})
    Config(block_size=4096, **fields)


def test_metrics_payload_carries_counter_increases_and_per_worker_gauges() -> None:
    # What DynblockConnector sends each step (dynblock.vllm.stats): the increases of the store's
    # counters since the last step, its gauges now; two workers' payloads merged as vLLM merges
    # them, counters summed, gauges summed over workers (each worker's latest).
    from dynblock import BlockManager
    from dynblock.vllm.stats import Deltas, empty_payload, merge, reduce, totals

    bs = 4096
    data = np.arange(8 * bs, dtype=np.uint32).view(np.uint8)[: 8 * bs]
    stores = [BlockManager(Config(block_size=bs, host_blocks=16, numa_node=None, pin=False))
              for _ in range(2)]
    try:
        deltas = [Deltas(rank) for rank in range(2)]
        for kv in stores:
            kv.put(list(range(1, 9)), data)
        first = [d.take(kv) for d, kv in zip(deltas, stores)]
        assert first[0]["counters"]["dynblock_put_blocks_total|"] == 8
        assert first[0]["gauges"]["dynblock_stored_blocks|host|0"] == 8
        out = np.zeros(4 * bs, np.uint8)
        assert stores[0].get([1, 2, 3, 4], out) == 4
        second = [d.take(kv) for d, kv in zip(deltas, stores)]
        # only what moved since: 4 hits on worker 0, nothing put again
        assert second[0]["counters"] == {"dynblock_hits_total|host": 4.0,
                                          "dynblock_hit_bytes_total|host": 4.0 * bs}
        assert second[1]["counters"] == {}
        step = empty_payload()
        for p in first + second:
            merge(step, p)
        counters, gauges = totals(step)
        assert counters[("dynblock_put_blocks_total", "")] == 16
        assert counters[("dynblock_hits_total", "host")] == 4
        assert gauges[("dynblock_stored_blocks", "host")] == 16  # 8 on each worker, not 8 twice
        assert gauges[("dynblock_capacity_blocks", "host")] == 32
        assert reduce(step)["dynblock_hits_total{host}"] == 4
    finally:
        for kv in stores:
            kv.close()
    # a closed store sends nothing, and says nothing went wrong
    assert deltas[0].take(stores[0]) == empty_payload()


def test_block_events_follow_whole_engine_blocks_through_the_tiers(tmp_path: Path) -> None:
    # What DynblockConnector announces (dynblock.vllm.events): an engine block is stored in a tier
    # once every layer of it is, removed when its first layer leaves; on a real LayerStore.
    from dynblock.vllm.events import BlockEvents

    st = layer_store(tmp_path, layers=2, host=4)
    try:
        ev = BlockEvents(num_layers=2, limit=64)
        st.kv.watch_events(1000)
        t = kv_tensor(8, 1)

        def save(layer: int, hs: list, rows: list) -> None:
            ev.saved(hs, layer, st.keys(hs, layer))
            st.save(layer, hs, t, rows, zero_copy=True).wait(10)

        save(0, H[:2], [0, 1])
        assert ev.apply(st.kv.take_events()) == []  # one layer of each: not whole yet
        save(1, H[:2], [0, 1])
        assert ev.apply(st.kv.take_events()) == [("stored", "host", H[0]), ("stored", "host", H[1])]
        # 4 host slots: H[2]'s layer 0 evicts H[0]'s layer 0: H[0] is no longer whole
        save(0, H[2:3], [2])
        assert ev.apply(st.kv.take_events()) == [("removed", "host", H[0])]
        save(1, H[2:3], [2])
        assert ev.apply(st.kv.take_events()) == [("removed", "host", H[1]),
                                                 ("stored", "host", H[2])]
        # keys of another writer (or a persistent store's recovered blocks) are not announced
        st.kv.put(st.keys(H[5:6], 0), t[5:6])
        assert ev.apply(st.kv.take_events()) == []
        st.kv.clear()
        assert ev.apply(st.kv.take_events()) == [("removed", "host", H[2])]
    finally:
        st.close()


def test_block_events_remember_a_bounded_number_of_keys() -> None:
    from dynblock.vllm.events import BlockEvents

    ev = BlockEvents(num_layers=1, limit=100)
    keys = list(range(1000, 1400))
    ev.saved([k.to_bytes(32, "little") for k in keys], 0, keys)
    # 400 keys saved, none stored yet: at most the limit are kept, the newest
    assert len(ev._block) <= 100 and (None, keys[-1]) in ev._block and (None, keys[0]) not in ev._block
    # a key that moves from host to disk is in neither for a moment and stays known
    assert ev.apply([("stored", "host", keys[-1]), ("removed", "host", keys[-1]),
                     ("stored", "disk", keys[-1])]) == [
        ("stored", "host", keys[-1].to_bytes(32, "little")),
        ("removed", "host", keys[-1].to_bytes(32, "little")),
        ("stored", "disk", keys[-1].to_bytes(32, "little"))]


def test_block_events_keep_namespaces_apart() -> None:
    from dynblock.vllm.events import BlockEvents

    ev = BlockEvents(num_layers=1, limit=100)
    ev.saved([b"a" * 32], 0, [7], "t1")
    ev.saved([b"b" * 32], 0, [7], "t2")  # the same store key in another namespace
    assert ev.apply([("stored", "host", 7, "t2"), ("stored", "host", 7, None),
                     ("removed", "host", 7, "t1")]) == [("stored", "host", b"b" * 32)]
    assert ev.apply([("stored", "host", 7, "t1")]) == [("stored", "host", b"a" * 32)]
