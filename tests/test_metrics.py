"""dynblock.metrics: a real prometheus_client registry over real managers, scraped over HTTP."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from dynblock import BlockManager, Config
from dynblock.metrics import METRICS, register

prometheus_client = pytest.importorskip(
    "prometheus_client", reason="prometheus_client is not installed (pip install 'dynblock[metrics]')")

BS = 4096


def scrape(registry) -> "dict[tuple, float]":
    """{(name, labels...): value} from the registry's text exposition, read over HTTP."""
    server, thread = prometheus_client.start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        port = server.server_address[1]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    out = {}
    for line in text.splitlines():
        m = re.match(r'^(dynblock_\w+)\{(.*)\} (\S+)$', line)
        if m:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(2))))
            out[(m.group(1), *labels)] = float(m.group(3))
    return out


def test_counters_reach_a_scrape_with_prometheus_names(tmp_path: Path) -> None:
    registry = prometheus_client.CollectorRegistry()
    cfg = Config(block_size=BS, host_blocks=2, disk_blocks=8, disk_dir=str(tmp_path),
                 numa_node=None, pin=False, write_behind=False)
    with BlockManager(cfg) as m:
        register(m, registry, store="kv")
        data = np.random.default_rng(1).integers(0, 256, 4 * BS, dtype=np.uint8)
        m.put([1, 2, 3, 4], data)  # host: 3 4, disk: 1 2
        out = np.zeros(4 * BS, np.uint8)
        # 3 and 4 from the host tier, 1 and 2 from disk (promoted: 3 and 4 go to disk)
        assert m.get([1, 2, 3, 4, 5], np.zeros(5 * BS, np.uint8)) == 4
        assert m.get([3, 9], out[:2 * BS]) == 1  # 3 from disk
        s = m.stats()
        got = scrape(registry)
    kv = ("store", "kv")
    assert got[("dynblock_hits_total", kv, ("tier", "disk"))] == s["disk_hits"] == 3
    assert got[("dynblock_hits_total", kv, ("tier", "host"))] == s["host_hits"] == 2
    assert got[("dynblock_hit_bytes_total", kv, ("tier", "disk"))] == 3 * BS
    assert got[("dynblock_misses_total", kv)] == s["misses"] == 2
    assert got[("dynblock_stored_blocks", kv, ("tier", "host"))] == s["host_blocks_used"]
    assert got[("dynblock_capacity_bytes", kv, ("tier", "disk"))] == 8 * BS
    assert got[("dynblock_evictions_total", kv, ("tier", "host"))] == s["host_evictions"] > 0
    assert got[("dynblock_offloaded_bytes_total", kv)] == s["offloaded_bytes"] > 0
    assert got[("dynblock_promoted_blocks_total", kv)] == s["onboarded_blocks"] == 3
    assert got[("dynblock_put_new_blocks_total", kv)] == 4
    assert got[("dynblock_o_direct", kv, ("tier", "disk"))] in (0.0, 1.0)
    assert not any(k[0].startswith("dynblock_remote_") for k in got)  # no remote tier here
    # Every family the collector yields is in the documented list, and vice versa for this
    # manager's tiers.
    names = {re.sub(r"_(bucket|count|sum|created)$", "", k[0]) for k in got}
    documented = {n for n, *_ in METRICS}
    assert names <= documented
    assert {n for n in documented if not n.startswith("dynblock_remote")} <= names


def test_latency_histograms_time_a_random_sample_of_calls() -> None:
    registry = prometheus_client.CollectorRegistry()
    n = 3200
    with BlockManager(Config(block_size=BS, host_blocks=8, numa_node=None, pin=False)) as m:
        register(m, registry, store="h")
        m.put([0, 1], np.zeros(2 * BS, np.uint8))
        out = np.zeros(BS, np.uint8)
        for _ in range(n):
            m.get([0], out)
        lease = m.lookup([0, 1])
        assert m.stats()["leases_held"] == 1
        got = scrape(registry)
        lease.release()
        assert m.stats()["leases_held"] == 0
    h = ("store", "h")
    # One call in 32 is timed, at random: 100 of 3200 expected (a standard deviation of 10).
    count = got[("dynblock_load_seconds_count", h)]
    assert 40 <= count <= 200, count
    assert got[("dynblock_load_seconds_bucket", ("le", "+Inf"), h)] == count
    assert 0 < got[("dynblock_load_seconds_sum", h)] < 60
    assert got[("dynblock_leases_held", h)] == 1
    buckets = sorted((float(k[1][1]), v) for k, v in got.items()
                     if k[0] == "dynblock_load_seconds_bucket" and k[1][1] != "+Inf")
    assert len(buckets) == 17 and buckets[-1][1] <= count
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    assert ("dynblock_store_seconds_count", h) in got and ("dynblock_lookup_seconds_count", h) in got


def test_two_managers_stay_apart_and_a_closed_one_drops_out() -> None:
    registry = prometheus_client.CollectorRegistry()
    cfg = Config(block_size=BS, host_blocks=4, numa_node=None, pin=False)
    a, b = BlockManager(cfg), BlockManager(cfg)
    try:
        register(a, registry, store="a")
        register(b, registry, store="b")
        a.put([1], np.zeros(BS, np.uint8))
        got = scrape(registry)
        assert got[("dynblock_put_blocks_total", ("store", "a"))] == 1
        assert got[("dynblock_put_blocks_total", ("store", "b"))] == 0
        b.close()
        got = scrape(registry)
        assert ("dynblock_put_blocks_total", ("store", "b")) not in got
        assert ("dynblock_put_blocks_total", ("store", "a")) in got
    finally:
        a.close()
        b.close()
    with pytest.raises(ValueError, match="store"):
        register(a, registry, store="")


def test_the_readme_documents_every_metric() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [n for n, *_ in METRICS if f"`{n}`" not in readme]
    assert not missing, missing


def test_remote_tier_families_follow_a_real_server(tmp_path: Path) -> None:
    from redis_servers import Server, need

    need("redis-server")
    srv = Server(tmp_path / "redis", [], kind="redis")
    registry = prometheus_client.CollectorRegistry()
    try:
        url = f"redis://127.0.0.1:{srv.port}"
        cfg = Config(block_size=BS, host_blocks=4, numa_node=None, pin=False, remote=url,
                     remote_write="sync", remote_timeout_ms=2000)
        with BlockManager(cfg) as w:
            w.put([1, 2], np.ones(2 * BS, np.uint8))
        with BlockManager(cfg) as r:
            register(r, registry, store="r")
            assert r.get([1, 2, 3], np.zeros(3 * BS, np.uint8)) == 2
            up = scrape(registry)
            srv.stop()
            r.get([7], np.zeros(BS, np.uint8))  # the server is gone: the tier goes down
            down = scrape(registry)
    finally:
        srv.stop()
    key = ("store", "r")
    assert up[("dynblock_hits_total", key, ("tier", "remote"))] == 2
    assert up[("dynblock_remote_misses_total", key)] == 1
    assert up[("dynblock_remote_up", key)] == 1.0
    assert down[("dynblock_remote_up", key)] == 0.0
    assert down[("dynblock_remote_errors_total", key)] >= 1


def test_the_grafana_dashboard_uses_only_exported_families() -> None:
    """docs/grafana/dynblock.json: every family its queries use is in the table
    (histograms by their _bucket series), and only per-tier families are split
    by tier."""
    import json
    import re

    from dynblock.metrics import METRICS

    path = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "dynblock.json"
    dash = json.loads(path.read_text())
    kinds = {name: (kind, per_tier) for name, kind, per_tier, _, _ in METRICS}
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    used = set()
    for e in exprs:
        for name in re.findall(r"\bdynblock_[a-z_]+", e):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if base in kinds and kinds[base][0] == "histogram":
                assert name.endswith("_bucket"), f"{name}: a histogram is read by its _bucket series"
                name = base
            assert name in kinds, f"the dashboard queries {name}, which dynblock.metrics does not export"
            used.add(name)
        for name in re.findall(r"by \(store, tier\) \(rate\((dynblock_[a-z_]+)", e):
            assert kinds[name][1], f"{name} has no tier label, yet the dashboard splits it by tier"
    assert {"dynblock_hits_total", "dynblock_misses_total", "dynblock_used_bytes",
            "dynblock_capacity_bytes", "dynblock_load_seconds"} <= used


# ---- tier events: what a KV-aware router learns ----------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_OPS = st.lists(st.one_of(
    st.tuples(st.just("put"), st.lists(st.integers(1, 24), min_size=1, max_size=6)),
    st.tuples(st.just("get"), st.lists(st.integers(1, 24), min_size=1, max_size=4)),
    st.tuples(st.just("remove"), st.lists(st.integers(1, 24), min_size=1, max_size=3)),
    st.tuples(st.just("clear"), st.just([])),
), max_size=30)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS, write_behind=st.booleans())
def test_applying_the_tier_events_in_order_gives_what_each_tier_holds(tmp_path: Path, ops,
                                                                       write_behind: bool) -> None:
    # A watcher that starts late (after some puts) and applies every event in order knows exactly
    # which blocks each tier holds, after any sequence of puts, gets (promotions), removals and
    # clears, through evictions and offloads of a host tier of 4 and a disk of 8. Write-behind
    # offloads in the background, so with it the views agree once it has settled.
    import time

    bs = 4096
    kv = BlockManager(Config(block_size=bs, host_blocks=4, disk_blocks=8, disk_dir=str(tmp_path),
                             numa_node=None, pin=False, write_behind=write_behind))
    try:
        kv.put([100, 101], np.zeros(2 * bs, np.uint8))
        kv.watch_events(10_000)
        seen: dict = {"host": set(), "disk": set()}

        def apply() -> None:
            for e in kv.take_events():
                if e.kind == "cleared":
                    seen["host"].clear()
                    seen["disk"].clear()
                elif e.kind == "stored":
                    assert e.hash not in seen[e.tier], e  # stored once until removed
                    seen[e.tier].add(e.hash)
                else:
                    seen[e.tier].remove(e.hash)  # removed only what was stored

        apply()
        assert seen["host"] == {100, 101}
        for op, hs in ops:
            if op == "put":
                kv.put(hs, np.zeros(len(hs) * bs, np.uint8))
            elif op == "get":
                kv.get(hs, np.zeros(len(hs) * bs, np.uint8))
            elif op == "remove":
                kv.remove(hs)
            else:
                kv.clear()
            if not write_behind:
                apply()
                host, disk = kv.lru_order()
                assert seen["host"] == set(host) and seen["disk"] == set(disk), (op, hs)
        deadline = time.monotonic() + 10
        while True:
            apply()
            host, disk = kv.lru_order()
            if seen["host"] == set(host) and seen["disk"] == set(disk):
                break
            assert time.monotonic() < deadline, (seen, host, disk)
            time.sleep(0.01)
        assert kv.stats()["events_lost"] == 0
    finally:
        kv.close()


def test_events_past_their_capacity_are_dropped_counted_and_logged_once(caplog) -> None:
    import logging

    kv = BlockManager(Config(block_size=4096, host_blocks=64, numa_node=None, pin=False))
    try:
        with pytest.raises(ValueError, match="capacity must be an int >= 0"):
            kv.watch_events(-1)
        kv.watch_events(5)
        kv.put(list(range(1, 9)), np.zeros(8 * 4096, np.uint8))
        with caplog.at_level(logging.WARNING, logger="dynblock"):
            events = kv.take_events()
            kv.put(list(range(9, 17)), np.zeros(8 * 4096, np.uint8))
            kv.take_events()
        # the newest 5 are kept, the oldest 3 dropped
        assert [e.hash for e in events] == [4, 5, 6, 7, 8]
        assert kv.stats()["events_lost"] == 6
        assert sum("tier events were dropped" in r.getMessage() for r in caplog.records) == 1
        kv.watch_events(0)  # stop
        kv.put([99], np.zeros(4096, np.uint8))
        assert kv.take_events() == []
    finally:
        kv.close()
