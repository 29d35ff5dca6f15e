"""The bench's own code paths at tiny sizes."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from dynblock import BlockManager, Config
from dynblock.bench import evaluate_goals, parse_size
from dynblock.bench.common import Case
from dynblock.bench.workloads import OVERHEAD_ROUNDS
from dynblock.bench.trace import find_trace, load_trace, parse_trace, replay

TINY = ["--repeat", "2", "--block-sizes", "64KiB", "--disk-size", "1MiB", "--batch-size", "256KiB",
        "--fio-depths", "1,4", "--host-size", "4MiB", "--populate-size", "4MiB",
        "--tiered-size", "16MiB", "--trace-requests", "20", "--payload", "16KiB",
        "--trace-host-blocks", "64", "--trace-disk-blocks", "256", "--recovery-blocks", "500",
        "--engine-seconds", "0.3"]


def run_bench(args, env=None, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dynblock.bench", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_parse_size() -> None:
    assert parse_size("2MiB") == 2 << 20
    assert parse_size("64k") == 64 << 10
    assert parse_size("4096") == 4096
    with pytest.raises(argparse.ArgumentTypeError, match="not a size: 'lots'"):
        parse_size("lots")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("bench")
    out = d / "r.json"
    r = run_bench(["--json", "--dir", str(d), "--out", str(out), *TINY])
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data == json.loads(out.read_text())
    assert sorted(os.listdir(d)) == ["r.json"]  # nothing else left behind
    return data


def test_json_schema(tiny_run) -> None:
    m = tiny_run["machine"]
    for k in ("kernel", "filesystem", "cpus", "build", "python"):
        assert m[k]
    assert {c["workload"] for c in tiny_run["cases"]} >= {"disk", "host", "tiered", "overhead", "durability",
                                                         "engine"}
    for c in tiny_run["cases"]:
        assert set(c) >= {"workload", "impl", "op", "params", "unit", "values", "median", "min", "max", "ratios"}
        # two repeats; the overhead cases time each repeat in rounds of alternated windows
        assert len(c["values"]) == (2 * OVERHEAD_ROUNDS if c["workload"] == "overhead" else 2)
        assert c["min"] <= c["median"] <= c["max"]
        assert all(v > 0 for v in c["values"])
    assert isinstance(tiny_run["goals"], list) and isinstance(tiny_run["notes"], list)


def test_engine_ratios_follow_the_measured_medians(tiny_run) -> None:
    by = {(c["impl"], c["op"], c["params"].get("threads")): c for c in tiny_run["cases"]
          if c["workload"] == "engine"}
    m = by[("dynblock", "match-32-during-disk-puts", None)]
    assert m["ratios"]["goal_1ms_over_p99"] == pytest.approx(1.0 / m["median"])
    free = by[("dynblock", "put-32-into-free-host-tier", None)]
    full = by[("dynblock", "put-32-into-full-host-tier", None)]
    assert full["ratios"]["free_over_full"] == pytest.approx(free["median"] / full["median"])
    one, four = by[("dynblock", "async-put-get", 1)], by[("dynblock", "async-put-get", 4)]
    # one thread and four take turns in each repeat: the median of each repeat's own ratio
    assert four["ratios"]["vs_1_thread"] == pytest.approx(
        statistics.median(f / o for f, o in zip(four["values"], one["values"])))
    goals = {g["goal"] for g in tiny_run["goals"]}
    assert any("match of 32 hashes" in g for g in goals)


def test_ratios_are_computed_from_the_measured_medians(tiny_run) -> None:
    cases = tiny_run["cases"]

    def find(impl, op, **p):
        return [c for c in cases if c["impl"] == impl and c["op"] == op
                and all(c["params"].get(k) == v for k, v in p.items())]

    for c in find("dynblock-o_direct", "read") + find("dynblock-o_direct", "write"):
        naive = find("python-naive", c["op"], block_size=c["params"]["block_size"])[0]
        assert c["ratios"]["vs_python_naive"] == pytest.approx(c["median"] / naive["median"])
        fios = find("fio", c["op"], block_size=c["params"]["block_size"])
        if fios:
            best = max(f["median"] for f in fios)
            assert c["ratios"]["vs_device_limit"] == pytest.approx(c["median"] / best)
    host_w = find("dynblock", "write", block_size=2 << 20)
    one = find("numpy-copyto-1thread", "copy")[0]
    many = [c for c in cases if c["impl"].startswith("numpy-copyto-") and c is not one][0]
    limit = max(one["median"], many["median"])
    assert host_w[0]["ratios"]["vs_memory_limit"] == pytest.approx(host_w[0]["median"] / limit)
    for op in ("put", "get", "put-offloading"):
        on, off = find("checksums-on", op)[0], find("checksums-off", op)[0]
        assert on["ratios"]["vs_checksums_off"] == pytest.approx(on["median"] / off["median"])
    reopen = find("dynblock", "reopen")[0]
    assert reopen["extra"]["recovered_blocks"] == 500 and reopen["unit"] == "s"
    s3 = [c for c in cases if c["workload"] == "overhead" and c["impl"] == "dynblock-s3fifo"]
    assert {c["op"] for c in s3} >= {"put-1000-present", "put-64-new-evicting"}
    for c in s3:  # calls per second against LRU's, the median of the rounds' own ratios
        lru = [b for b in find("dynblock", c["op"]) if b["workload"] == "overhead"][0]
        assert c["ratios"]["vs_lru"] == pytest.approx(
            statistics.median(b / v for b, v in zip(lru["values"], c["values"])))
    pop = find("dynblock", "populate")[0]
    single = find("single-thread-touch", "populate")[0]
    assert pop["ratios"]["speedup_vs_single_thread"] == pytest.approx(single["median"] / pop["median"])


def test_cpu_per_gib_is_reported_next_to_every_throughput(tiny_run) -> None:
    """Every GiB/s case of dynblock and its baselines carries CPU seconds per GiB (this
    process's threads and children, or fio's own usr + sys), and the CPU ratios follow them."""
    rates = [c for c in tiny_run["cases"] if c["unit"] == "GiB/s" and c["workload"] != "trace"
             and c["impl"] != "fio"]  # fio reports no CPU for jobs this short
    assert rates
    for c in rates:
        assert len(c["cpu_values"]) == 2 and c["cpu_s_per_gib"] >= 0, (c["impl"], c["op"])
    assert sum(c["cpu_s_per_gib"] for c in rates if c["impl"].startswith("dynblock")) > 0
    for c in tiny_run["cases"]:
        if c["impl"].startswith("dynblock-") and c["workload"] == "disk":
            naive = [n for n in tiny_run["cases"] if n["impl"] == "python-naive" and n["op"] == c["op"]
                     and n["params"]["block_size"] == c["params"]["block_size"]][0]
            if naive["cpu_s_per_gib"] > 0:
                assert c["ratios"]["cpu_vs_python_naive"] == pytest.approx(
                    c["cpu_s_per_gib"] / naive["cpu_s_per_gib"])
            else:  # too short to register any CPU: no ratio rather than a division by zero
                assert "cpu_vs_python_naive" not in c["ratios"]
    for op in ("put", "get", "put-offloading"):
        on, off = [[c for c in tiny_run["cases"] if c["impl"] == name and c["op"] == op][0]
                   for name in ("checksums-on", "checksums-off")]
        if off["cpu_s_per_gib"] > 0:
            assert on["ratios"]["cpu_vs_checksums_off"] == pytest.approx(
                on["cpu_s_per_gib"] / off["cpu_s_per_gib"])


def test_goals_follow_the_ratios() -> None:
    c = Case("disk", "dynblock-o_direct", "read", dict(block_size=2 << 20, pattern="random"))
    c.values = [1.0]
    c.ratios = {"vs_device_limit": 1.05, "vs_python_naive": 0.5, "cpu_vs_device_limit": 1.2}
    goals = evaluate_goals([c])
    by = {g["goal"]: g for g in goals}
    assert by["2 MiB random reads >= 1.0x fio's best depth"]["met"] is True
    assert by["cold reads at least as fast as naive buffered Python (2 MiB)"]["met"] is False
    assert by["2 MiB random reads: CPU per GiB <= 1.0x fio's at its best depth"]["met"] is False
    # An upper bound (a time over its baseline's): met at or below the threshold.
    put = Case("remote", "dynblock-async", "put-32", dict(block_size=256 << 10))
    put.values = [1.0]
    for ratio, met in ((1.1, True), (1.3, False)):
        put.ratios = {"vs_no_remote": ratio}
        (g,) = evaluate_goals([put])
        assert g["met"] is met and g["threshold"] == 1.2


def test_clear_message_when_fio_is_missing(tmp_path: Path) -> None:
    py_dir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items()}
    env["PATH"] = py_dir  # a PATH without fio
    if shutil.which("fio", path=env["PATH"]):
        pytest.skip("fio sits beside the Python executable")
    r = run_bench(["--workloads", "disk", "--dir", str(tmp_path), *TINY], env=env)
    assert r.returncode == 0, r.stderr
    assert "fio is not installed" in r.stdout and "apt-get install fio" in r.stdout
    assert "vs_device_limit" not in r.stdout  # no ratio to a limit that was not measured


def test_table_output_and_progress_free_pipe(tmp_path: Path) -> None:
    r = run_bench(["--workloads", "host,overhead", "--dir", str(tmp_path), *TINY])
    assert r.returncode == 0, r.stderr
    assert "dynblock bench:" in r.stdout and "vs_memory_limit" in r.stdout
    assert "us/call" in r.stdout and "\r[" not in r.stderr  # no progress bar when not a tty


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--repeat", "0"], "--repeat"),
        (["--workloads", "disk,gpu"], "choose from"),
        (["--block-sizes", "big"], "not a size"),
        (["--dir", "/nonexistent/dir"], "not a directory"),
        (["--trace", "/nonexistent.jsonl"], "neither a file nor a shipped trace"),
        (["--fio-depths", "0"], ">= 1"),
    ],
)
def test_bad_arguments_exit_2(args, msg) -> None:
    r = run_bench(args)
    assert r.returncode == 2 and msg in r.stderr


# --- trace parsing and hit counting -------------------------------------------

SMALL_TRACE = """\
{"timestamp": 0, "input_length": 1536, "output_length": 10, "hash_ids": [1, 2, 3]}
{"timestamp": 5, "input_length": 1536, "output_length": 10, "hash_ids": [1, 2, 4]}

{"timestamp": 9, "input_length": 512, "output_length": 1, "hash_ids": [5]}
{"timestamp": 12, "input_length": 2048, "output_length": 3, "hash_ids": [1, 2, 4, 6]}
"""


def test_parse_trace_and_errors_name_the_line() -> None:
    reqs = parse_trace(SMALL_TRACE.splitlines())
    assert [r.hash_ids for r in reqs] == [[1, 2, 3], [1, 2, 4], [5], [1, 2, 4, 6]]
    assert reqs[1].timestamp == 5
    assert len(parse_trace(SMALL_TRACE.splitlines(), limit=2)) == 2
    with pytest.raises(ValueError, match=r"t.jsonl:2"):
        parse_trace(['{"hash_ids": [1]}', '{"hash_ids": "x"}'], source="t.jsonl")
    with pytest.raises(ValueError, match=":1"):
        parse_trace(["not json"])
    with pytest.raises(ValueError, match="hash_ids"):
        parse_trace(['{"timestamp": 1}'])


def test_replay_hit_counting_matches_hand_computation(tmp_path: Path) -> None:
    reqs = parse_trace(SMALL_TRACE.splitlines())
    # host 2, disk 10:
    # r1 [1,2,3]: no hit; put 1,2,3 -> host [2,3], disk [1]
    # r2 [1,2,4]: match 2; get 1 (disk) and 2 (host); then 1 is promoted, evicting 3
    #             -> host [2,1]; put 4 -> evicts 2 -> host [1,4]
    # r3 [5]: no hit; put 5 -> host [4,5]
    # r4 [1,2,4,6]: match 3; 1 disk, 2 disk, 4 host; put 6
    # hits 2 + 3 = 5 of 11 refs; host hits 1 + 1 = 2; disk hits 1 + 2 = 3
    cfg = Config(block_size=4096, host_blocks=2, disk_blocks=10, disk_dir=str(tmp_path),
                 numa_node=None, pin=False)
    with BlockManager(cfg) as m:
        r = replay(m, reqs)
    assert (r.requests, r.block_refs, r.hit_blocks) == (4, 11, 5)
    assert (r.host_hits, r.disk_hits) == (2, 3)
    assert r.put_blocks == 6 and r.tokens_saved == 5 * 512
    assert r.as_dict()["hit_rate"] == pytest.approx(5 / 11)


def test_shipped_traces_load_from_the_installed_package() -> None:
    # The bench's trace workload must work on any machine: the traces ship inside the package.
    for name, n_requests in (("mooncake_conversation", 12031), ("mooncake_synthetic", 3993)):
        path = find_trace(name)
        assert path is not None and path.endswith(".jsonl.gz"), path
        assert find_trace(name.split("_", 1)[1]) == path
        reqs = load_trace(path)
        assert len(reqs) == n_requests and all(r.hash_ids for r in reqs)


def test_trace_option_takes_a_path_or_a_shipped_name(tmp_path: Path) -> None:
    plain = tmp_path / "t.jsonl"
    plain.write_text('{"hash_ids": [1, 2]}\n{"hash_ids": [1, 3]}\n')
    assert find_trace(str(plain)) == str(plain)
    assert [r.hash_ids for r in load_trace(str(plain))] == [[1, 2], [1, 3]]
    assert find_trace("no_such_trace") is None
    r = run_bench(["--workloads", "trace", "--trace", "no_such_trace", "--dir", str(tmp_path)])
    assert r.returncode == 2 and "neither a file nor a shipped trace" in r.stderr


def test_plot(tmp_path: Path) -> None:
    png = tmp_path / "p.png"
    args = ["--workloads", "disk", "--dir", str(tmp_path), "--plot", str(png), "--no-fio", *TINY]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        r = run_bench(args)
        assert r.returncode == 2 and "needs matplotlib" in r.stderr
        return
    r = run_bench(args)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_remote_workload_runs_against_real_servers(tmp_path: Path) -> None:
    # Small sizes; the workload asserts the bytes it gets back itself.
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server/redis-cli are not installed (apt-get install redis-server redis-tools)")
    from dynblock.bench.common import Progress, Results
    from dynblock.bench.remote import run_remote

    res = Results()
    run_remote(res, str(tmp_path), 1, Progress(False), total=4 << 20)
    got = {(c.impl, c.op, c.params.get("block_size")) for c in res.cases if c.values}
    assert ("dynblock", "get", 256 << 10) in got and ("dynblock", "get", 2 << 20) in got
    assert ("dynblock-async", "put-32", 256 << 10) in got
    async_put = res.find("remote", "dynblock-async", "put-32", block_size=256 << 10)
    assert async_put is not None and "vs_no_remote" in async_put.ratios
    assert isinstance(async_put.extra["remote_skipped"], int)  # recorded with the times
    assert ("dynblock-async", "put-32-same-source", 256 << 10) in got
    cluster = res.find("remote", "3-master-cluster", "get-4-threads", block_size=256 << 10)
    assert cluster is None or "vs_1_server" in cluster.ratios  # absent only with a note
    assert cluster is not None or res.notes


def test_belady_matches_a_hand_computed_optimum_and_bounds_lru() -> None:
    from dynblock.bench.policy import belady_hits

    # Capacity 2, references 1 2 3 1 2: on 3, MIN evicts 2 (next used after 1), so 1 hits: 1 hit.
    # LRU evicts 1 on 3, then 2 on 1, then misses 2: 0 hits.
    assert belady_hits([[1, 2], [3], [1], [2]], 2) == 1
    assert belady_hits([[1, 2], [3], [1], [2]], 3) == 2
    assert belady_hits([[1, 1, 1]], 0) == 0 and belady_hits([[1, 1, 1]], 1) == 2


def test_policy_replay_counts_what_admission_keeps_off_the_disk(tmp_path: Path) -> None:
    from dynblock.bench.policy import replay, with_scans

    # Host 2, disk 8: requests that never come back, then one that does.
    reqs = [[1, 2], [3, 4], [5, 6], [1, 2], [1, 2]]
    every = replay(reqs, 2, 8, ("lru", "lru"), "all", str(tmp_path))
    reuse = replay(reqs, 2, 8, ("lru", "lru"), "reuse", str(tmp_path))
    # "all" writes every host victim: 1-4, then 5 and 6 when 1 and 2 come back from disk.
    # "reuse" writes none: no block is asked for twice while in the host tier; 1 and 2 come
    # back on their second sighting (recomputed) and stay in the host tier.
    assert (every["disk_writes"], every["disk_hits"], every["disk_not_admitted"]) == (6, 2, 0)
    assert (reuse["disk_writes"], reuse["disk_hits"], reuse["disk_not_admitted"]) == (0, 0, 6)
    assert every["hit_rate"] == 4 / 10 and reuse["hit_rate"] == 2 / 10
    with pytest.raises(ValueError, match="disk_eviction"):
        replay(reqs, 2, 8, ("lru", "fifo"), "all", str(tmp_path))
    scanned = with_scans([[1, 2], [3], [4], [5], [6]], every=2)
    extra = [r for r in scanned if r not in ([1, 2], [3], [4], [5], [6])]
    assert len(scanned) == 7 and all(min(r) > 6 for r in extra)
    assert not set(extra[0]) & set(extra[1])


def test_policy_workload_reports_every_trace_and_capacity_under_belady(tmp_path: Path) -> None:
    r = run_bench(["--workloads", "policy", "--dir", str(tmp_path), "--json"], timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    cases = [c for c in out["cases"] if c["workload"] == "policy" and c["op"] == "replay"]
    assert {c["params"]["trace"] for c in cases} == {"conversation", "synthetic", "conversation+scans"}
    impls = {"lru/all", "s3fifo/all", "lru+s3fifo/all", "lru/reuse"}
    assert len(cases) == 3 * 3 * 4 and {c["impl"] for c in cases} == impls
    for c in cases:
        e = c["extra"]
        assert 0 < e["hit_rate"] <= e["belady"] <= 1, c
        assert c["ratios"]["of_belady"] == pytest.approx(e["hit_rate"] / e["belady"])
        assert (e["disk_not_admitted"] > 0) == (c["impl"] == "lru/reuse")
        if c["impl"] in ("s3fifo/all", "lru+s3fifo/all"):
            lru = next(b for b in cases if b["impl"] == "lru/all" and b["params"] == c["params"])
            points = 100 * (e["hit_rate"] - lru["extra"]["hit_rate"])
            assert c["ratios"]["hit_vs_lru_points"] == pytest.approx(points)
            gap = e["belady"] - lru["extra"]["hit_rate"]
            assert c["ratios"]["gap_closed"] == pytest.approx(points / 100 / gap)
    # Tenants: with quotas the flooded tenant keeps its hit rate; sharing the store it does not.
    tenants = [c for c in out["cases"] if c["workload"] == "policy" and c["op"] == "tenants"]
    assert len(tenants) == 3 * 4
    assert {c["impl"] for c in tenants} == {"quotas/alone", "quotas/flood", "shared/alone", "shared/flood"}
    for c in tenants:
        if c["impl"].endswith("/flood"):
            alone = next(b for b in tenants if b["impl"] == c["impl"].replace("flood", "alone")
                         and b["params"] == c["params"])
            assert c["ratios"]["vs_alone"] == pytest.approx(c["values"][0] / alone["values"][0])
            assert c["extra"]["flood_blocks"] > 0
        if c["impl"] == "quotas/flood":
            assert c["ratios"]["vs_alone"] >= 0.95, c
        if c["impl"] == "shared/flood":
            assert c["ratios"]["vs_alone"] < 0.95, c
    goals = [g for g in out["goals"] if "10x flood" in g["goal"]]
    assert len(goals) == 3 and all(g["met"] for g in goals), goals
    goals = [g for g in out["goals"] if "disk_admission" in g["goal"]]
    assert len(goals) == 2 * 9 and all(g["key"] in ("writes_per_disk_hit_vs_all", "hit_vs_all_points")
                                       for g in goals)
    # The eviction goals: never below LRU on every case, the gap on the conversation trace's.
    goals = [g for g in out["goals"] if "beyond LRU" in g["goal"]]
    assert sorted(g["key"] for g in goals) == ["gap_closed"] * 3 + ["hit_vs_lru_points"] * 9
    assert os.listdir(tmp_path) == []  # every replay's disk file is gone


def test_sglang_workload_measures_dynblock_beside_hicache_file(tmp_path: Path) -> None:
    """The sglang workload, small: both backends measured on SGLang's own host
    pool, every op at every page size, the goals evaluated, nothing left behind."""
    from dynblock.bench.sglang import find_sglang_python

    py, why = find_sglang_python()
    if py is None:
        pytest.skip(why)
    r = run_bench(["--workloads", "sglang", "--dir", str(tmp_path), "--json", "--repeat", "1",
                   "--sglang-page-sizes", "64KiB,128KiB", "--sglang-size", "8MiB",
                   "--sglang-python", py], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    cases = {(c["impl"], c["op"], c["params"]["block_size"]): c for c in out["cases"]
             if c["workload"] == "sglang"}
    cold = "get-cold" if os.geteuid() == 0 else "get"
    for impl in ("dynblock", "hicache-file"):
        for op in ("set-return", "set-durable", cold, "exists-128-during-writes"):
            for pb in (64 << 10, 128 << 10):
                c = cases[(impl, op, pb)]
                assert c["values"] and all(v > 0 for v in c["values"]), c
    d = cases[("dynblock", "set-durable", 64 << 10)]
    assert d["ratios"]["vs_hicache_file"] > 0 and d["ratios"]["cpu_vs_hicache_file"] > 0
    assert any(g["goal"].startswith("64 KiB pages: batch_set_v1 until durable") for g in out["goals"])
    assert os.listdir(tmp_path) == []


def test_vllmtier_workload_measures_dynblock_tier_beside_vllms_fs_tier(tmp_path: Path) -> None:
    """The vllmtier workload, small: DynblockTier (checksums on and off, and zero-filled) and
    vLLM's own fs tier, made by vLLM's factory, store and load every chunk (the loads are
    compared byte for byte in the measuring process), each tier's making is timed, ratios and
    goals evaluated, nothing left behind."""
    from dynblock.bench.vllm import find_vllm_python

    py, why = find_vllm_python()
    if py is None:
        pytest.skip(why)
    r = run_bench(["--workloads", "vllmtier", "--dir", str(tmp_path), "--json", "--repeat", "1",
                   "--vllm-tier-chunk-sizes", "64KiB", "--vllm-tier-size", "4MiB",
                   "--vllm-python", py], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    cases = {(c["impl"], c["op"]): c for c in out["cases"] if c["workload"] == "vllmtier"}
    for impl in ("dynblock-tier", "dynblock-tier-no-checksums", "dynblock-tier-zero-filled",
                 "vllm-fs-tier"):
        for op in ("store", "load-cold"):
            c = cases[(impl, op)]
            assert c["values"] and all(v > 0 for v in c["values"]) and c["cpu_s_per_gib"] > 0, c
        assert cases[(impl, "open")]["unit"] == "s" and cases[(impl, "open")]["values"][0] > 0
    d = cases[("dynblock-tier", "load-cold")]
    assert d["ratios"]["vs_vllm_fs_tier"] > 0 and d["ratios"]["cpu_vs_vllm_fs_tier"] > 0
    assert any(g["goal"] == "DynblockTier store >= 1.5x vLLM's fs tier" for g in out["goals"])
    assert os.listdir(tmp_path) == []
