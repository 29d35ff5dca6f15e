"""GPU -> NUMA node resolution: parser fixtures from real machines, a fake
nvidia-smi on PATH, and a fake sysfs tree."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import dynblock
from dynblock import HostStorage
from conftest import run_py
from dynblock.topology import (
    GpuTopology,
    numa_node_for_gpu,
    parse_cpu_list,
    parse_nvidia_smi_topo,
    resolve_gpu,
)

FIX = Path(__file__).parent / "fixtures" / "nvidia_smi"


def load(name: str) -> str:
    return (FIX / name).read_text()


# (fixture, {gpu: (numa_node, first cpu, last cpu, cpu count, gpu_numa_id)})
CASES = {
    "h100_8gpu_10nic.txt": {0: (0, 0, 167, 112, None), 4: (1, 56, 223, 112, None), 7: (1, 56, 223, 112, None)},
    "dgx_8gpu_nv8_9nic.txt": {0: (0, 0, 143, 96, None), 5: (1, 48, 191, 96, None)},
    "h20_8gpu_4nodes.txt": {0: (0, 0, 119, 48, None), 3: (1, 24, 143, 48, None),
                            6: (2, 48, 167, 48, None), 7: (3, 72, 191, 48, None)},
    "rtx_2gpu_tabs.txt": {0: (0, 0, 63, 64, None), 1: (0, 0, 63, 64, None)},
    "rtx4090_8gpu_nic_rows.txt": {3: (0, 0, 167, 112, None), 6: (1, 56, 223, 112, None)},
    "mixed_5gpu_gpu0_node1.txt": {0: (1, 8, 31, 16, None), 1: (0, 0, 23, 16, None)},
    "kepler_mlx4_cpu_affinity_only.txt": {0: (None, 0, 29, 20, None), 7: (None, 10, 39, 20, None)},
    "a100_2gpu_nic_legend_comment.txt": {0: (0, 0, 95, 64, None), 1: (1, 32, 127, 64, None)},
    "single_gpu_na.txt": {0: (None, 0, 15, 16, None)},
    "gh200_grace.txt": {0: (0, 0, 71, 72, 1)},
    "h200_1gpu_ansi_header.txt": {0: (0, 0, 15, 16, None)},
}
GPU_COUNTS = {
    "h100_8gpu_10nic.txt": 8, "dgx_8gpu_nv8_9nic.txt": 8, "h20_8gpu_4nodes.txt": 8,
    "rtx_2gpu_tabs.txt": 2, "rtx4090_8gpu_nic_rows.txt": 8, "mixed_5gpu_gpu0_node1.txt": 5,
    "kepler_mlx4_cpu_affinity_only.txt": 8, "a100_2gpu_nic_legend_comment.txt": 2,
    "single_gpu_na.txt": 1, "gh200_grace.txt": 1, "h200_1gpu_ansi_header.txt": 1,
}


def test_every_fixture_is_covered() -> None:
    assert sorted(p.name for p in FIX.glob("*.txt")) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_parse_real_outputs(name: str) -> None:
    topo = parse_nvidia_smi_topo(load(name))
    assert sorted(topo) == list(range(GPU_COUNTS[name]))  # NIC rows never become GPUs
    for gpu, (node, first, last, count, gnid) in CASES[name].items():
        rec = topo[gpu]
        assert isinstance(rec, GpuTopology) and rec.index == gpu
        assert rec.numa_node == node
        assert rec.cpu_affinity[0] == first and rec.cpu_affinity[-1] == last
        assert len(rec.cpu_affinity) == count
        assert rec.gpu_numa_id == gnid


def test_padding_and_crlf_do_not_matter() -> None:
    text = load("h20_8gpu_4nodes.txt")
    crlf = text.replace("\n", "\r\n")
    assert parse_nvidia_smi_topo(crlf) == parse_nvidia_smi_topo(text)
    comment = "# captured with nvidia-smi 550.54\n\n" + text
    assert parse_nvidia_smi_topo(comment) == parse_nvidia_smi_topo(text)


@pytest.mark.parametrize(
    "text,match",
    [
        ("", "no header"),
        ("No devices were found\n", "no header"),
        ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n", "no header"),
        ("\tGPU0\tCPU Affinity\n", "no GPU rows"),
        ("\tGPU0\tGPU1\tCPU Affinity\nGPU0\t X \tBOGUS\t0-3\n", "connection type"),
        ("\tGPU0\tGPU1\tCPU Affinity\nGPU0\t X \n", "cells"),
        ("\tGPU0\tCPU Affinity\tNUMA Affinity\nGPU0\t X \t0-3\tzero\n", "not a number"),
        ("\tGPU0\tCPU Affinity\nGPU0\t X \t3-1\n", "backwards"),
    ],
)
def test_unparseable_text_raises_value_error(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_nvidia_smi_topo(text)


def test_non_text_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        parse_nvidia_smi_topo(b"GPU0")  # type: ignore[arg-type]


@given(st.lists(st.tuples(st.integers(0, 500), st.integers(0, 20)), min_size=1, max_size=8))
def test_cpu_list_round_trip(ranges) -> None:
    expect = []
    parts = []
    for a, n in ranges:
        parts.append(f"{a}-{a + n}" if n else f"{a}")
        expect.extend(range(a, a + n + 1))
    assert parse_cpu_list(",".join(parts)) == expect


# --- the resolver, with a fake nvidia-smi ------------------------------------

QUERY = textwrap.dedent(
    """\
    0, GPU-0a1b2c3d-0000-1111-2222-333344445555, 00000000:18:00.0
    1, GPU-1b2c3d4e-0000-1111-2222-333344445555, 00000000:2A:00.0
    2, GPU-2c3d4e5f-0000-1111-2222-333344445555, 00000000:3A:00.0
    3, GPU-3d4e5f60-0000-1111-2222-333344445555, 00000000:5D:00.0
    4, GPU-4e5f6071-0000-1111-2222-333344445555, 00000000:9A:00.0
    5, GPU-5f607182-0000-1111-2222-333344445555, 00000000:AB:00.0
    6, GPU-60718293-0000-1111-2222-333344445555, 00000000:BA:00.0
    7, GPU-718293a4-0000-1111-2222-333344445555, 00000000:DB:00.0
    """
)


def fake_nvidia_smi(tmp: Path, topo_text: str, query_text: str = QUERY, fail_topo: bool = False) -> Path:
    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    (tmp / "topo.txt").write_text(topo_text)
    (tmp / "query.txt").write_text(query_text)
    exe = bindir / "nvidia-smi"
    exe.write_text(
        "#!/bin/sh\n"
        f'case "$1" in\n'
        f"  --query-gpu=*) cat '{tmp / 'query.txt'}' ;;\n"
        f"  topo) {'exit 9' if fail_topo else 'cat ' + repr(str(tmp / 'topo.txt'))} ;;\n"
        "  *) echo unknown >&2; exit 2 ;;\n"
        "esac\n"
    )
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def fake_sysfs(tmp: Path, nodes: dict) -> Path:
    root = tmp / "sys"
    for bdf, node in nodes.items():
        d = root / "bus" / "pci" / "devices" / bdf
        d.mkdir(parents=True)
        (d / "numa_node").write_text(f"{node}\n")
    root.mkdir(exist_ok=True)
    return root


def env_with(path_dir: Path, **extra: str) -> dict:
    e = {"PATH": f"{path_dir}:{os.environ.get('PATH', '')}"}
    e.update(extra)
    return e


def test_ordinal_maps_through_cuda_visible_devices(tmp_path: Path) -> None:
    exe = fake_nvidia_smi(tmp_path, load("h100_8gpu_10nic.txt"))
    sysfs = fake_sysfs(tmp_path, {"0000:9a:00.0": 1, "0000:18:00.0": 0})
    env = env_with(exe.parent, CUDA_VISIBLE_DEVICES="4,5")
    r = resolve_gpu(0, sysfs_root=str(sysfs), env=env)
    assert r.physical_index == 4 and r.numa_node == 1
    assert r.sysfs_numa_node == 1 and r.topo_numa_node == 1 and "confirmed" in r.reason
    # without the remapping, ordinal 0 is physical GPU 0 on node 0
    assert numa_node_for_gpu(0, sysfs_root=str(sysfs), env=env_with(exe.parent)) == 0


def test_uuid_entries_in_cuda_visible_devices(tmp_path: Path) -> None:
    exe = fake_nvidia_smi(tmp_path, load("h100_8gpu_10nic.txt"))
    env = env_with(exe.parent, CUDA_VISIBLE_DEVICES="GPU-718293a4,GPU-0a1b2c3d-0000")
    assert resolve_gpu(0, sysfs_root=str(tmp_path / "nosys"), env=env).physical_index == 7
    assert numa_node_for_gpu(0, sysfs_root=str(tmp_path / "nosys"), env=env) == 1
    assert numa_node_for_gpu(1, sysfs_root=str(tmp_path / "nosys"), env=env) == 0
    with pytest.raises(ValueError, match="not visible"):
        numa_node_for_gpu(2, env=env)
    env = env_with(exe.parent, CUDA_VISIBLE_DEVICES="MIG-4f1b0b7e-1234")
    assert numa_node_for_gpu(0, env=env) is None


def test_unknown_is_none_never_a_guess(tmp_path: Path) -> None:
    # no nvidia-smi at all
    assert numa_node_for_gpu(0, env={"PATH": str(tmp_path)}) is None
    # N/A in the table and -1 in sysfs
    exe = fake_nvidia_smi(tmp_path, load("single_gpu_na.txt"))
    sysfs = fake_sysfs(tmp_path, {"0000:18:00.0": -1})
    r = resolve_gpu(0, sysfs_root=str(sysfs), env=env_with(exe.parent))
    assert r.numa_node is None and "N/A" in r.reason


def test_disagreement_between_nvidia_smi_and_sysfs_is_none(tmp_path: Path) -> None:
    exe = fake_nvidia_smi(tmp_path, load("h100_8gpu_10nic.txt"))
    sysfs = fake_sysfs(tmp_path, {"0000:18:00.0": 1})  # table says 0
    r = resolve_gpu(0, sysfs_root=str(sysfs), env=env_with(exe.parent))
    assert r.numa_node is None and "not guessing" in r.reason


def test_sysfs_alone_when_topo_fails(tmp_path: Path) -> None:
    exe = fake_nvidia_smi(tmp_path, "", fail_topo=True)
    sysfs = fake_sysfs(tmp_path, {"0000:2a:00.0": 3})
    r = resolve_gpu(1, sysfs_root=str(sysfs), env=env_with(exe.parent))
    assert r.numa_node == 3 and r.reason == "from sysfs"


def test_injected_executable_path(tmp_path: Path) -> None:
    exe = fake_nvidia_smi(tmp_path, load("mixed_5gpu_gpu0_node1.txt"))
    assert numa_node_for_gpu(0, nvidia_smi=str(exe), sysfs_root=str(tmp_path), env={}) == 1


@pytest.mark.parametrize("bad", [-1, True, 1.0])
def test_bad_device_argument(tmp_path: Path, bad) -> None:
    exe = fake_nvidia_smi(tmp_path, load("rtx_2gpu_tabs.txt"))
    with pytest.raises(ValueError, match="ordinal"):
        numa_node_for_gpu(bad, nvidia_smi=str(exe), env={})


# --- malformed sysfs lists ----------------------------------------------------


def test_a_huge_range_in_a_sysfs_list_is_an_error_not_an_abort(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    (sysfs / "devices/system/node/node0").mkdir(parents=True)
    (sysfs / "devices/system/node/online").write_text("0-4000000000\n")
    r = run_py(f"""
        try:
            dynblock.HostStorage(1, 4096, numa_node=0, pin=False, sysfs_root={str(sysfs)!r})
        except dynblock.NumaError as e:
            print("NumaError:", e)
    """)
    assert r.returncode == 0 and "above the largest possible" in r.stdout, r.stdout + r.stderr
    d = subprocess.run([sys.executable, "-m", "dynblock.doctor", "--json", "--sysfs-root", str(sysfs),
                        "--dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert d.returncode in (0, 1), d.stderr
    import json

    assert "checks" in json.loads(d.stdout)


# --- topology input ------------------------------------------------------------------

QUERY_ONE = "0, GPU-11111111-2222-3333-4444-555555555555, 00000000:18:00.0\n"


@pytest.mark.parametrize("query,topo,why", [
    (b"0, GPU-1111\xff\xfe, 00000000:18:00.0\n", None, None),  # non-UTF-8 bytes
    (b"No devices were found\n", None, "does not know"),
    (b"", None, "lists no GPUs"),
    (None, b"\tGPU0\tCPU Affinity\tNUMA Affinity\nGPU0\t X \t0-4000000000\t0\n", "does not know"),
    (None, b"\tGPU0\tCPU Affinity\tNUMA Affinity\nGPU0\t X \t0-3\t99999999999999999999999\n",
     "does not know"),
])
def test_odd_nvidia_smi_output_means_no_binding_with_a_reason(tmp_path: Path, query, topo, why) -> None:
    exe = fake_nvidia_smi(tmp_path, load("single_gpu_na.txt"), QUERY_ONE)
    if query is not None:
        (tmp_path / "query.txt").write_bytes(query)
    if topo is not None:
        (tmp_path / "topo.txt").write_bytes(topo)
    r = dynblock.topology.resolve_gpu(0, sysfs_root=str(tmp_path / "nosys"), env=env_with(exe.parent))
    assert r.numa_node is None
    if why:
        assert why in r.reason, r.reason
    # and through the host tier: no binding, no exception from deep inside
    h = HostStorage(1, 4096, gpu=0, pin=False, nvidia_smi=str(exe), sysfs_root=str(tmp_path / "nosys"))
    assert h.numa_node is None
    h.close()


@pytest.mark.parametrize("cvd", ["\u00b2", "\uff10", "GPU-", "0,0", "00,0", "GPU-1111,GPU-1111"])
def test_cuda_visible_devices_that_cuda_refuses_name_the_variable(tmp_path: Path, cvd: str) -> None:
    exe = fake_nvidia_smi(tmp_path, load("single_gpu_na.txt"), QUERY_ONE)
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        dynblock.topology.resolve_gpu(0, env=env_with(exe.parent, CUDA_VISIBLE_DEVICES=cvd))
