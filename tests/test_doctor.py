"""python -m dynblock.doctor in subprocesses with real limits, filesystems and a
fake nvidia-smi."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

import dynblock
from dynblock import doctor

GiB = 1 << 30


def run_doctor(args: List[str], *, limits: Optional[Dict[str, int]] = None, drop_ipc_lock: bool = False,
               env: Optional[dict] = None) -> subprocess.CompletedProcess:
    prefix: List[str] = []
    if drop_ipc_lock:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv is not installed")
        prefix += ["setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock"]
    if limits:
        if shutil.which("prlimit") is None:
            pytest.skip("prlimit is not installed")
        prefix += ["prlimit"] + [f"--{k}={v}:{v}" for k, v in limits.items()]
    e = {k: v for k, v in os.environ.items() if not k.startswith(("DYNBLOCK_", "DYN_"))}
    e.update(env or {})
    return subprocess.run(prefix + [sys.executable, "-m", "dynblock.doctor", *args],
                          capture_output=True, text=True, timeout=120, env=e)


def checks_of(r: subprocess.CompletedProcess) -> Dict[str, dict]:
    data = json.loads(r.stdout)
    for c in data["checks"]:
        assert set(c) == {"name", "status", "value", "required", "fix", "detail"}
        assert c["status"] in ("ok", "warn", "fail")
    return {c["name"]: c for c in data["checks"]}


def test_low_limits_without_cap_ipc_lock(tmp_path: Path) -> None:
    r = run_doctor(["--json", "--dir", str(tmp_path), "--host-gib", "1"],
                   limits={"memlock": 65536, "nofile": 512, "stack": 1 << 20}, drop_ipc_lock=True)
    assert r.returncode == 1, r.stderr
    c = checks_of(r)
    assert c["memlock"]["status"] == "fail"
    assert c["memlock"]["value"] == {"soft": 65536, "hard": 65536, "cap_ipc_lock": False}
    assert "--ulimit memlock=-1" in c["memlock"]["fix"]
    assert c["nofile"]["status"] == "fail" and c["nofile"]["value"]["soft"] == 512
    assert "--ulimit nofile=65536:65536" in c["nofile"]["fix"]
    assert c["stack"]["status"] == "warn" and "--ulimit stack=67108864" in c["stack"]["fix"]
    assert c["capabilities"]["value"]["CAP_IPC_LOCK"] is False
    assert "--cap-add IPC_LOCK" in c["capabilities"]["fix"]


def test_cap_ipc_lock_makes_a_low_memlock_fine(tmp_path: Path) -> None:
    if not doctor._cap_eff() or not doctor._cap_eff() >> doctor.CAP_IPC_LOCK & 1:
        pytest.skip("this process lacks CAP_IPC_LOCK")
    r = run_doctor(["--json", "--dir", str(tmp_path), "--host-gib", "1"], limits={"memlock": 65536})
    c = checks_of(r)
    assert c["memlock"]["status"] == "ok" and c["memlock"]["value"]["cap_ipc_lock"] is True


def test_suggest_docker_and_k8s_fix_what_fails(tmp_path: Path) -> None:
    args = ["--dir", str(tmp_path), "--host-gib", "1", "--shm-gib", "100000"]
    r = run_doctor(args + ["--suggest", "docker"], limits={"memlock": 65536, "nofile": 512},
                   drop_ipc_lock=True)
    assert r.returncode == 1
    first = r.stdout.splitlines()[0]
    assert first.startswith("docker run ")
    for flag in ("--ulimit memlock=-1", "--ulimit nofile=65536:65536", "--shm-size=100000g"):
        assert flag in first
    r = run_doctor(args + ["--suggest", "k8s"], limits={"memlock": 65536}, drop_ipc_lock=True)
    y = r.stdout
    assert "emptyDir:" in y and "medium: Memory" in y and "sizeLimit: 100000Gi" in y
    assert "mountPath: /dev/shm" in y
    assert "capabilities:" in y and "IPC_LOCK" in y


def test_ramfs_cache_dir(ramfs_dir: Path) -> None:
    r = run_doctor(["--json", "--dir", str(ramfs_dir), "--disk-gib", "1"])
    c = checks_of(r)
    assert c["o_direct"]["status"] == "warn"
    assert c["o_direct"]["value"]["filesystem"] == "ramfs" and c["o_direct"]["value"]["o_direct"] is False
    assert "EINVAL" in c["o_direct"]["detail"] and "DYNBLOCK_DISABLE_O_DIRECT" in c["o_direct"]["fix"]
    assert c["fallocate"]["status"] == "warn" and c["fallocate"]["value"] == "zero-fill"
    assert c["cache_fs"]["status"] == "warn" and "ramfs" in c["cache_fs"]["detail"]
    assert c["disk_space"]["status"] == "warn"  # ramfs reports no capacity
    assert os.listdir(ramfs_dir) == []  # the probe left nothing


def test_tiny_tmpfs_cache_dir(tiny_tmpfs: Path) -> None:
    r = run_doctor(["--json", "--dir", str(tiny_tmpfs), "--disk-gib", "1"])
    assert r.returncode == 1
    c = checks_of(r)
    assert c["disk_space"]["status"] == "fail" and c["disk_space"]["value"] <= 16 << 20
    assert "free" in c["disk_space"]["fix"]
    assert c["cache_fs"]["status"] == "warn" and c["cache_fs"]["value"] == "tmpfs"
    assert c["fallocate"]["status"] == "ok"


def test_fake_gpu_with_fake_nvidia_smi(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_topology import fake_nvidia_smi, load

    exe = fake_nvidia_smi(tmp_path, load("h100_8gpu_10nic.txt"))
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "nvidia0").write_text("")
    (dev / "nvidiactl").write_text("")
    r = run_doctor(["--json", "--dir", str(tmp_path), "--gpu", "0", "--nvidia-smi", str(exe),
                    "--dev-root", str(dev)], env={"CUDA_VISIBLE_DEVICES": "4"})
    c = checks_of(r)
    assert c["gpu"]["status"] == "ok" and c["gpu"]["value"]["dev_nodes"] == ["nvidia0", "nvidiactl"]
    assert c["gpu"]["value"]["CUDA_VISIBLE_DEVICES"] == "4"
    g = c["gpu_numa"]
    assert g["value"]["physical_index"] == 4 and g["value"]["numa_node"] == 1
    # GPU 4 sits on node 1; this machine may not have it: either way no crash.
    assert "cpuset" in c
    # no device nodes: the GPU the configuration needs is not visible
    empty = tmp_path / "nodev"
    empty.mkdir()
    r = run_doctor(["--json", "--dir", str(tmp_path), "--gpu", "0", "--nvidia-smi", str(exe),
                    "--dev-root", str(empty)])
    assert r.returncode == 1
    c = checks_of(r)
    assert c["gpu"]["status"] == "fail" and "--gpus all" in c["gpu"]["fix"]


def test_missing_tools_and_files_are_reported_not_crashed(tmp_path: Path) -> None:
    r = run_doctor(["--json", "--dir", str(tmp_path / "nope"), "--gpu", "0",
                    "--nvidia-smi", str(tmp_path / "no-nvidia-smi"), "--sysfs-root", str(tmp_path / "nosys")],
                   env={"PATH": os.path.dirname(sys.executable)})
    assert r.returncode == 1, r.stderr
    c = checks_of(r)
    assert c["cache_dir"]["status"] == "fail" and "mkdir -p" in c["cache_dir"]["fix"]
    assert c["gpu"]["status"] == "fail"
    assert c["numa"]["status"] == "ok" and "no NUMA in sysfs" in c["numa"]["detail"]


def test_config_from_env(tmp_path: Path) -> None:
    r = run_doctor(["--json", "--config-from-env"],
                   env={"DYN_KVBM_DISK_CACHE_GB": "1000000", "DYN_KVBM_DISK_CACHE_DIR": str(tmp_path),
                        "DYN_KVBM_CPU_CACHE_GB": "2"})
    data = json.loads(r.stdout)
    assert data["config"]["dir"] == str(tmp_path)
    # No block size in the environment: whole blocks of a nominal 1 MiB.
    assert 10**15 - (1 << 20) < data["config"]["disk_bytes"] <= 10**15
    assert 2 * 10**9 - (1 << 20) < data["config"]["host_bytes"] <= 2 * 10**9
    c = {x["name"]: x for x in data["checks"]}
    assert c["disk_space"]["status"] == "fail"  # a petabyte does not fit
    bad = run_doctor(["--config-from-env"], env={"DYN_KVBM_DISK_DISABLE_O_DIRECT": "sometimes"})
    assert bad.returncode == 2 and "DYN_KVBM_DISK_DISABLE_O_DIRECT" in bad.stderr


@pytest.mark.parametrize("args", [["--host-gib", "-1"], ["--gpu", "-2"], ["--suggest", "podman"],
                                  ["--disk-gib", "many"]])
def test_bad_arguments_exit_2(args) -> None:
    assert run_doctor(args).returncode == 2


def test_run_checks_api_matches_the_cli(tmp_path: Path) -> None:
    checks = doctor.run_checks(directory=str(tmp_path), disk_bytes=1 << 20)
    names = [c.name for c in checks]
    for n in ("shm", "memlock", "nofile", "stack", "ipc", "capabilities", "cgroup_memory", "numa",
              "gpu", "o_direct", "fallocate", "disk_space", "io_uring"):
        assert n in names
    with dynblock.DiskStorage(tmp_path, 1, 4096) as probe:  # what a disk tier there runs on
        ring = next(c for c in checks if c.name == "io_uring")
        assert (ring.status == doctor.OK) == (probe.engine == "io_uring"), (ring, probe.engine)
    r = run_doctor(["--json", "--dir", str(tmp_path), "--disk-gib", str(1 / 1024)])
    cli = checks_of(r)
    for c in checks:
        if c.name in ("shm", "nofile", "stack", "o_direct", "fallocate", "disk_space"):
            assert cli[c.name]["status"] == c.status, c.name
    table = subprocess.run([sys.executable, "-m", "dynblock.doctor", "--dir", str(tmp_path)],
                           capture_output=True, text=True)
    assert "ok," in table.stdout and "fail" in table.stdout


# --- doctor input


@pytest.mark.parametrize("arg", ["--host-gib", "--shm-gib", "--disk-gib"])
@pytest.mark.parametrize("value", ["inf", "1e400", "nan"])
def test_doctor_refuses_non_finite_sizes_with_a_usage_error(arg: str, value: str) -> None:
    r = subprocess.run([sys.executable, "-m", "dynblock.doctor", arg, value], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "finite" in r.stderr and "Traceback" not in r.stderr


def test_doctor_advice_fits_what_is_at_the_path(tmp_path: Path) -> None:
    f = tmp_path / "afile"
    f.write_text("x")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    for p, words in ((f, "is a file"), (fifo, "is a FIFO"), (loop, "symbolic link"),
                     (tmp_path / "missing", "mkdir -p")):
        (c,) = [c for c in doctor.check_cache_dir(str(p), 1 << 20) if c.name == "cache_dir"]
        assert c.status == "fail" and words in c.fix, (p, c.fix)
        if words != "mkdir -p":
            assert "mkdir" not in c.fix
