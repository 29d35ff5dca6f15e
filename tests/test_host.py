"""The host tier: real mmap/mbind/mlock, placement asked of the kernel."""

from __future__ import annotations

import json
import mmap
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import dynblock
from dynblock import HostStorage, NumaError
from dynblock.cuda import MAX_REGISTER_CHUNK, chunks

MiB = 1 << 20


def test_placement_on_node_0(clean_env) -> None:
    with HostStorage(32, MiB, numa_node=0) as h:
        assert h.numa_node == 0 and h.policy == "bind"
        pages = h.placement()
        total = h.nbytes // mmap.PAGESIZE
        assert pages.get(0, 0) == total, pages  # every page resident, all on node 0
        assert -1 not in pages


def test_round_trip_and_zero_copy_views(clean_env) -> None:
    h = HostStorage(8, 5000, numa_node=None, pin=False)
    assert h.slot_stride == 8192 and h.policy == "none" and h.numa_node is None
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, size=3 * 5000, dtype=np.uint8)
    h.write_blocks([6, 0, 2], src)
    dst = np.zeros_like(src)
    h.read_blocks(np.array([6, 0, 2], dtype=np.uint64), dst)
    assert np.array_equal(src, dst)
    blk = np.frombuffer(h.block(0), dtype=np.uint8)
    assert blk.flags.writeable and len(blk) == 5000
    assert np.array_equal(blk, src[5000:10000])
    blk[:] = 9  # writes land in the slot
    one = np.zeros(5000, dtype=np.uint8)
    h.read_blocks([0], one)
    assert (one == 9).all()
    whole = np.frombuffer(h.view(), dtype=np.uint8)
    assert len(whole) == h.nbytes and (whole[:5000] == 9).all()
    # a live view keeps the memory mapped after close
    h.close()
    assert h.closed
    assert (blk == 9).all() and (whole[:10] == 9).all()
    with pytest.raises(ValueError, match="closed"):
        h.read_blocks([0], one)
    with pytest.raises(ValueError, match="closed"):
        h.block(0)


def test_pinning_works_as_root_with_cap_ipc_lock(clean_env) -> None:
    if not dynblock._core.has_capability(14):
        pytest.skip("this process lacks CAP_IPC_LOCK")
    with HostStorage(4, MiB, numa_node=None, pin="require") as h:
        assert h.pinned


def _run_child(code: str, *, drop_ipc_lock: bool, memlock: int) -> subprocess.CompletedProcess:
    prefix = []
    if drop_ipc_lock:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv (util-linux) is not installed")
        prefix = ["setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock"]
    script = textwrap.dedent(
        f"""
        import json, logging, resource, sys
        resource.setrlimit(resource.RLIMIT_MEMLOCK, ({memlock}, {memlock}))
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        import dynblock
        """
    ) + textwrap.dedent(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DYNBLOCK_", "DYN_"))}
    return subprocess.run(prefix + [sys.executable, "-c", script], capture_output=True,
                          text=True, timeout=60, env=env)


def test_memlock_fallback_without_cap_ipc_lock() -> None:
    r = _run_child(
        """
        h = dynblock.HostStorage(4, 1 << 20, numa_node=None)
        print(json.dumps(dict(pinned=h.pinned, cap=dynblock._core.has_capability(14))))
        """,
        drop_ipc_lock=True,
        memlock=64 << 10,
    )
    if r.returncode != 0 and "setpriv" in r.stderr:
        pytest.skip(f"cannot drop capabilities here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out == {"pinned": False, "cap": False}
    warnings = [line for line in r.stderr.splitlines() if "dynblock.host" in line]
    assert len(warnings) == 1
    w = warnings[0]
    assert "RLIMIT_MEMLOCK is 65536 bytes" in w and "4194304 bytes" in w
    assert "--ulimit memlock=-1" in w and "CAP_IPC_LOCK" in w


def test_memlock_require_raises_without_cap_ipc_lock() -> None:
    r = _run_child(
        """
        try:
            dynblock.HostStorage(4, 1 << 20, numa_node=None, pin="require")
        except dynblock.PinError as e:
            print("PinError:", e)
        """,
        drop_ipc_lock=True,
        memlock=64 << 10,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("PinError:") and "--ulimit memlock=-1" in r.stdout


def test_root_with_cap_ipc_lock_pins_past_a_low_limit() -> None:
    if not dynblock._core.has_capability(14):
        pytest.skip("this process lacks CAP_IPC_LOCK")
    r = _run_child(
        "print(dynblock.HostStorage(4, 1 << 20, numa_node=None).pinned)",
        drop_ipc_lock=False,
        memlock=64 << 10,
    )
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr


def test_numa_can_be_disabled_by_environment(clean_env) -> None:
    clean_env.setenv("DYN_MEMORY_DISABLE_NUMA", "true")
    with HostStorage(2, MiB, numa_node=0, pin=False) as h:
        assert h.numa_node is None and h.policy == "none"
        assert "DISABLE_NUMA" in h.numa_reason
    clean_env.setenv("DYN_MEMORY_DISABLE_NUMA", "maybe")
    with pytest.raises(dynblock.EnvError, match="DYN_MEMORY_DISABLE_NUMA"):
        HostStorage(2, MiB)


def test_auto_node_from_a_fake_nvidia_smi(tmp_path: Path, clean_env) -> None:
    from test_topology import fake_nvidia_smi, load

    exe = fake_nvidia_smi(tmp_path, load("h100_8gpu_10nic.txt"))
    with HostStorage(2, MiB, gpu=1, nvidia_smi=str(exe), pin=False) as h:
        assert h.numa_node == 0 and h.policy == "bind"
        assert "GPU 1" in h.numa_reason
    with HostStorage(2, MiB, pin=False) as h:  # "auto" without a GPU binds nothing
        assert h.numa_node is None and "without gpu" in h.numa_reason
    # GPU 4 sits on node 1, which this one-node machine does not have
    if 1 not in _memory_nodes():
        with pytest.raises(NumaError, match="node 1 does not exist"):
            HostStorage(2, MiB, gpu=4, nvidia_smi=str(exe), pin=False)


def _memory_nodes() -> list:
    try:
        text = Path("/sys/devices/system/node/has_memory").read_text()
    except OSError:
        return [0]
    from dynblock.topology import parse_cpu_list

    return parse_cpu_list(text)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(num_blocks=-1), ValueError, "num_blocks"),
        (dict(num_blocks=0), ValueError, "num_blocks"),
        (dict(block_size=-4096), ValueError, "block_size"),
        (dict(block_size=1.5), TypeError, "block_size"),
        (dict(numa_node=999), NumaError, "999 does not exist"),
        (dict(numa_node=-1), ValueError, "numa_node"),
        (dict(numa_node="near"), TypeError, "numa_node"),
        (dict(pin="maybe"), ValueError, "pin"),
        (dict(alignment=100), dynblock.AlignmentError, "power of two"),
        (dict(num_blocks=2**50, block_size=2**20), ValueError, "num_blocks .* got 1125899906842624"),
        (dict(num_blocks=2**31, block_size=2**32), ValueError, "too large"),
    ],
)
def test_bad_arguments(clean_env, kwargs, exc, match) -> None:
    args = dict(num_blocks=2, block_size=4096)
    args.update(kwargs)
    nb, bs = args.pop("num_blocks"), args.pop("block_size")
    with pytest.raises(exc, match=match):
        HostStorage(nb, bs, **args)


def test_bad_batches(clean_env) -> None:
    with HostStorage(4, 4096, numa_node=None, pin=False) as h:
        with pytest.raises(IndexError, match="slot id 4"):
            h.write_blocks([4], np.zeros(4096, np.uint8))
        with pytest.raises(ValueError, match="need exactly"):
            h.write_blocks([1], np.zeros(10, np.uint8))
        with pytest.raises(ValueError, match="more than once"):
            h.write_blocks([1, 1], np.zeros(8192, np.uint8))
        with pytest.raises(BufferError, match="read-only"):
            h.read_blocks([1], bytes(4096))
        with pytest.raises(IndexError):
            h.block(-1)


def test_cuda_registration_is_never_faked(clean_env) -> None:
    from dynblock.cuda import gpu_available

    with HostStorage(2, MiB, numa_node=None, pin=False, cuda_register=True) as h:
        ok, why = gpu_available()
        assert h.cuda_registered is ok
        if not ok:
            assert "cuda-python" in h.cuda_reason or "no CUDA device" in h.cuda_reason
            pytest.skip(f"no GPU here: {why}")


def test_registration_chunks_stay_under_the_cap() -> None:
    size = 600 << 30
    cs = chunks(1 << 40, size)
    assert [n for _, n in cs] == [MAX_REGISTER_CHUNK, MAX_REGISTER_CHUNK, size - 2 * MAX_REGISTER_CHUNK]
    assert cs[1][0] == (1 << 40) + MAX_REGISTER_CHUNK
    assert chunks(0, 0) == []


def test_the_gpu_host_tier_bench_never_claims_a_run_it_did_not_make() -> None:
    """benches/gpu_host_tier.py without a GPU (or torch) says SKIPPED with the reason
    and exits 77; with one it reports its copies and PASS or FAIL."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benches" / "gpu_host_tier.py"
    r = subprocess.run([sys.executable, str(script), "--gib", "1", "--repeat", "2"],
                       capture_output=True, text=True, timeout=600)
    if r.returncode == 77:
        assert r.stdout.startswith("SKIPPED: ") and "PASS" not in r.stdout, r.stdout
    else:
        assert r.returncode in (0, 1) and ("PASS: " in r.stdout or "FAIL: " in r.stdout), \
            (r.stdout + r.stderr)[-3000:]
        assert '"h2d_GBps"' in r.stdout
