"""``python -m dynblock.doctor``: check the container's resource limits before serving.

Each check reports a status (ok / warn / fail), the measured value, what the
configuration needs, and the fix. The probes are the tiers' own: the disk
tier's O_DIRECT/alignment/preallocation probe on a tiny anonymous file, the
host tier's mbind and placement, and the topology resolver for GPUs. A check
never crashes on a missing file or tool: it reports it.

Exit status: 0 when nothing fails (warnings alone exit 0), 1 when something
fails, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

from . import _core
from .topology import parse_cpu_list, resolve_gpu

GiB = 1 << 30
OK, WARN, FAIL = "ok", "warn", "fail"

CAP_IPC_LOCK, CAP_SYS_ADMIN, CAP_SYS_NICE = 14, 21, 23
INIT_IPC_NS_INODE = 0xEFFFFFFF  # the kernel's initial IPC namespace (PROC_IPC_INIT_INO)

NOFILE_WANT = 65536
STACK_WANT = 67108864
SHM_DEFAULT_WANT = 1 * GiB  # below this (Docker's default is 64 MiB) shared memory users break


@dataclass
class Check:
    name: str
    status: str
    value: Any
    required: str
    fix: str = ""
    detail: str = ""
    docker: List[str] = field(default_factory=list)
    k8s: Dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        return d


def _gib(n: Optional[float]) -> str:
    if n is None:
        return "unlimited"
    return f"{n / GiB:.2f} GiB"


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _cap_eff() -> Optional[int]:
    text = _read("/proc/self/status")
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return None


def _limit(res: int) -> "tuple[Optional[int], Optional[int]]":
    soft, hard = resource.getrlimit(res)
    inf = resource.RLIM_INFINITY
    return (None if soft == inf else soft, None if hard == inf else hard)


# --- the checks ----------------------------------------------------------------

def check_shm(shm_bytes: Optional[int], shm_path: str = "/dev/shm") -> Check:
    try:
        st = os.statvfs(shm_path)
    except OSError as e:
        return Check("shm", FAIL, None, "a writable /dev/shm", f"mount /dev/shm (--shm-size=10g): {e}",
                     docker=["--shm-size=10g"])
    size, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    want = shm_bytes if shm_bytes else SHM_DEFAULT_WANT
    flag = f"--shm-size={max(10, -(-want // GiB))}g"
    value = f"size {_gib(size)}, free {_gib(free)}"
    k8s = {"shm_bytes": max(want, 10 * GiB)}
    if free >= want:
        return Check("shm", OK, value, f">= {_gib(want)} free", "")
    status = FAIL if shm_bytes else WARN
    return Check("shm", status, value, f">= {_gib(want)} free",
                 f"docker run {flag} (Kubernetes: mount an emptyDir with medium: Memory at /dev/shm)",
                 docker=[flag], k8s=k8s)


def check_memlock(host_bytes: int) -> Check:
    soft, hard = _limit(resource.RLIMIT_MEMLOCK)
    caps = _cap_eff()
    cap = bool(caps is not None and caps >> CAP_IPC_LOCK & 1)
    value = {"soft": soft, "hard": hard, "cap_ipc_lock": cap}
    need = f">= {_gib(host_bytes)} (the host tier) or CAP_IPC_LOCK" if host_bytes else "unlimited or CAP_IPC_LOCK"
    fix = "docker run --ulimit memlock=-1 (or --cap-add IPC_LOCK); shell: ulimit -l unlimited"
    if cap or soft is None or (host_bytes and soft >= host_bytes):
        return Check("memlock", OK, value, need)
    status = FAIL if host_bytes else WARN
    detail = (f"RLIMIT_MEMLOCK is {soft} bytes; pinning a {_gib(host_bytes)} host tier needs more, "
              "so it would run unpinned" if host_bytes else f"RLIMIT_MEMLOCK is only {soft} bytes")
    return Check("memlock", status, value, need, fix, detail,
                 docker=["--ulimit memlock=-1"], k8s={"capabilities": ["IPC_LOCK"]})


def check_nofile() -> Check:
    soft, hard = _limit(resource.RLIMIT_NOFILE)
    value = {"soft": soft, "hard": hard}
    if soft is None or soft >= NOFILE_WANT:
        return Check("nofile", OK, value, f">= {NOFILE_WANT}")
    status = FAIL if soft < 1024 else WARN
    return Check("nofile", status, value, f">= {NOFILE_WANT}",
                 "docker run --ulimit nofile=65536:65536; shell: ulimit -n 65536",
                 docker=["--ulimit nofile=65536:65536"])


def check_stack() -> Check:
    soft, hard = _limit(resource.RLIMIT_STACK)
    value = {"soft": soft, "hard": hard}
    if soft is None or soft >= STACK_WANT:
        return Check("stack", OK, value, f">= {STACK_WANT}")
    return Check("stack", WARN, value, f">= {STACK_WANT}",
                 "docker run --ulimit stack=67108864; shell: ulimit -s 65536",
                 docker=["--ulimit stack=67108864"])


def check_ipc() -> Check:
    try:
        ino = os.stat("/proc/self/ns/ipc").st_ino
    except OSError as e:
        return Check("ipc", WARN, None, "host IPC namespace (--ipc host) for shared pools",
                     detail=f"cannot tell the IPC namespace: {e}")
    host = ino == INIT_IPC_NS_INODE
    limits = {}
    for k in ("shmmax", "shmall", "shmmni"):
        v = _read(f"/proc/sys/kernel/{k}")
        limits[k] = int(v) if v and v.strip().isdigit() else None
    value = {"host_namespace": host, **limits}
    if host:
        return Check("ipc", OK, value, "host IPC namespace for shared pools")
    return Check("ipc", WARN, value, "host IPC namespace for shared pools",
                 "docker run --ipc host (Kubernetes: hostIPC: true) if processes share a host pool",
                 "a private IPC namespace: fine for one process per GPU",
                 docker=["--ipc host"], k8s={"hostIPC": True})


def check_capabilities(numa_probe: Optional[str]) -> Check:
    caps = _cap_eff()
    if caps is None:
        return Check("capabilities", WARN, None, "CAP_IPC_LOCK, CAP_SYS_NICE",
                     detail="cannot read /proc/self/status")
    last = _read("/proc/sys/kernel/cap_last_cap")
    all_caps = (1 << (int(last) + 1)) - 1 if last and last.strip().isdigit() else None
    have = {n: bool(caps >> b & 1) for n, b in
            (("CAP_IPC_LOCK", CAP_IPC_LOCK), ("CAP_SYS_NICE", CAP_SYS_NICE), ("CAP_SYS_ADMIN", CAP_SYS_ADMIN))}
    privileged = all_caps is not None and caps & all_caps == all_caps
    value = {**have, "privileged": privileged}
    missing = [n for n in ("CAP_IPC_LOCK", "CAP_SYS_NICE") if not have[n]]
    need = "CAP_IPC_LOCK (pinning past RLIMIT_MEMLOCK), CAP_SYS_NICE (mbind in many containers)"
    if privileged:
        return Check("capabilities", OK, value, need, "",
                     "running privileged: dynblock needs only --cap-add IPC_LOCK --cap-add SYS_NICE; "
                     "drop --privileged unless something else needs it")
    if not missing:
        return Check("capabilities", OK, value, need)
    flags = [f"--cap-add {m[4:]}" for m in missing]
    status = WARN
    detail = ""
    if "CAP_SYS_NICE" in missing and numa_probe and numa_probe != "bind":
        detail = f"mbind(MPOL_BIND) was refused here (policy fell back to {numa_probe})"
    return Check("capabilities", status, value, need, "docker run " + " ".join(flags), detail,
                 docker=flags, k8s={"capabilities": [m[4:] for m in missing]})


def _cgroup_memory_limit() -> Optional[int]:
    for p in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        v = _read(p)
        if v is None:
            continue
        v = v.strip()
        if v == "max":
            return None
        if v.isdigit():
            n = int(v)
            return None if n >= 1 << 62 else n
    return None


def check_cgroup_memory(host_bytes: int) -> Check:
    limit = _cgroup_memory_limit()
    value = {"limit": limit}
    if limit is None:
        return Check("cgroup_memory", OK, value, f">= {_gib(host_bytes)} + headroom")
    need = host_bytes + GiB  # the host tier plus the process itself
    if host_bytes and limit < need:
        want = -(-need // GiB) + 1
        return Check("cgroup_memory", FAIL, value, f">= {_gib(need)} (host tier + 1 GiB)",
                     f"docker run --memory={want}g (Kubernetes: resources.limits.memory: {want}Gi)",
                     f"the container may use {_gib(limit)}; a {_gib(host_bytes)} host tier would be OOM-killed",
                     docker=[f"--memory={want}g"], k8s={"memory_bytes": want * GiB})
    return Check("cgroup_memory", OK, value, f">= {_gib(host_bytes)} + headroom")


def check_numa(sysfs_root: str) -> Check:
    base = os.path.join(sysfs_root, "devices/system/node")
    online = _read(os.path.join(base, "online"))
    if online is None:
        return Check("numa", OK, {"nodes": [0]}, "", detail="no NUMA in sysfs: one node")
    nodes = {}
    try:
        for n in parse_cpu_list(online):
            cpus = parse_cpu_list(_read(os.path.join(base, f"node{n}/cpulist")) or "")
            mem = None
            mi = _read(os.path.join(base, f"node{n}/meminfo")) or ""
            for line in mi.splitlines():
                if "MemTotal:" in line:
                    mem = int(line.split()[-2]) * 1024
            nodes[n] = {"cpus": len(cpus), "memory_bytes": mem, "cpu_less": not cpus}
    except ValueError as e:
        return Check("numa", WARN, None, "", detail=f"cannot read the NUMA topology: {e}")
    cpu_less = [n for n, v in nodes.items() if v["cpu_less"]]
    summary = "; ".join(
        f"node{n}: {v['cpus']} CPUs, {_gib(v['memory_bytes']) if v['memory_bytes'] else '? GiB'}"
        for n, v in nodes.items())
    detail = summary + (f"; CPU-less nodes (GPU or CXL memory): {cpu_less}" if cpu_less else "")
    return Check("numa", OK, {"count": len(nodes), "cpu_less": cpu_less, "nodes": nodes}, "",
                 detail=detail)


def check_gpus(gpu: Optional[int], nvidia_smi: str, sysfs_root: str, dev_root: str = "/dev") -> List[Check]:
    out = []
    exe = nvidia_smi if os.sep in nvidia_smi else shutil.which(nvidia_smi)
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    devs = sorted(p for p in os.listdir(dev_root) if p.startswith("nvidia")) if os.path.isdir(dev_root) else []
    value = {"nvidia_smi": exe, "CUDA_VISIBLE_DEVICES": cvd, "dev_nodes": devs}
    want = gpu is not None
    if not exe or not os.path.exists(exe):
        out.append(Check("gpu", FAIL if want else WARN, value, "nvidia-smi and /dev/nvidia* visible",
                         "docker run --gpus all (Kubernetes: resources.limits nvidia.com/gpu)",
                         "no nvidia-smi: GPU NUMA placement cannot be resolved (the host tier binds nothing)",
                         docker=["--gpus all"], k8s={"gpus": 1}))
        return out
    if not devs:
        out.append(Check("gpu", FAIL if want else WARN, value, "/dev/nvidia* present",
                         "docker run --gpus all", "nvidia-smi exists but no /dev/nvidia* device nodes",
                         docker=["--gpus all"], k8s={"gpus": 1}))
        return out
    out.append(Check("gpu", OK, value, "nvidia-smi and /dev/nvidia* visible"))
    if gpu is not None:
        try:
            r = resolve_gpu(gpu, nvidia_smi=exe, sysfs_root=sysfs_root)
        except ValueError as e:
            out.append(Check("gpu_numa", FAIL, None, f"GPU {gpu} visible", str(e)))
            return out
        v = {"physical_index": r.physical_index, "pci_bus_id": r.pci_bus_id, "numa_node": r.numa_node}
        if r.numa_node is None:
            out.append(Check("gpu_numa", WARN, v, "a known NUMA node", "", r.reason))
        else:
            out.append(Check("gpu_numa", OK, v, "a known NUMA node", "", r.reason))
            cpulist = os.path.join(sysfs_root, f"devices/system/node/node{r.numa_node}/cpulist")
            node_cpus = parse_cpu_list(_read(cpulist) or "")
            allowed = sorted(os.sched_getaffinity(0))
            both = sorted(set(node_cpus) & set(allowed))
            cv = {"allowed_cpus": len(allowed), "gpu_node_cpus": len(node_cpus), "usable": len(both)}
            if node_cpus and not both:
                out.append(Check("cpuset", WARN, cv, f"CPUs of node {r.numa_node} in the cpuset",
                                 f"docker run --cpuset-cpus={','.join(map(str, node_cpus[:8]))}... "
                                 "(CPUs near the GPU)",
                                 "no CPU near the GPU is in this process's cpuset"))
            else:
                out.append(Check("cpuset", OK, cv, f"CPUs of node {r.numa_node} in the cpuset"))
    return out


def _not_a_directory_fix(directory: str) -> str:
    """Advice for a cache path that is not a usable directory, fitting what is there."""
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return f"create it (mkdir -p {directory}) or mount a volume there"
    except OSError as e:
        return f"{directory} cannot be examined ({e.strerror}); check the permissions of its parents"
    import stat as _stat

    if _stat.S_ISLNK(st.st_mode):
        return (f"{directory} is a symbolic link that does not lead to a directory (broken or a "
                "loop); point it at a directory or give the directory itself")
    if _stat.S_ISDIR(st.st_mode):
        return f"{directory} cannot be read by uid {os.geteuid()}; fix its permissions"
    kind = ("a FIFO" if _stat.S_ISFIFO(st.st_mode) else "a socket" if _stat.S_ISSOCK(st.st_mode)
            else "a device" if _stat.S_ISBLK(st.st_mode) or _stat.S_ISCHR(st.st_mode)
            else "a file")
    return f"{directory} is {kind}, not a directory: give a directory (e.g. its parent)"


def check_cache_dir(directory: str, disk_bytes: int) -> List[Check]:
    from .disk import DiskStorage

    out = []
    fs = _core.fs_type(directory) if os.path.isdir(directory) else None
    value: Dict[str, Any] = {"path": directory, "filesystem": fs}
    if fs is None:
        out.append(Check("cache_dir", FAIL, value, "an existing, writable directory",
                         _not_a_directory_fix(directory)))
        return out
    if not os.access(directory, os.W_OK):
        out.append(Check("cache_dir", FAIL, value, "write permission",
                         f"make {directory} writable for uid {os.geteuid()}"))
        return out
    try:
        st = os.statvfs(directory)
        free = st.f_bavail * st.f_frsize if st.f_blocks else None
    except OSError:
        free = None
    value["free_bytes"] = free
    try:
        with DiskStorage(directory, 1, 4096, preallocate="auto") as probe:
            value.update(o_direct=probe.o_direct, alignment=probe.alignment,
                         memory_alignment=probe.memory_alignment,
                         alignment_source=probe.alignment_source,
                         preallocation=probe.preallocation, fallback_reason=probe.fallback_reason,
                         engine=probe.engine)
    except Exception as e:  # a probe failure is a finding, not a crash
        out.append(Check("cache_dir", FAIL, value, "a disk tier file can be created",
                         f"use another directory: {type(e).__name__}: {e}"))
        return out
    volatile = fs in ("tmpfs", "ramfs", "overlayfs")
    if not value["o_direct"]:
        out.append(Check("o_direct", WARN, value, "O_DIRECT",
                         "put the cache on ext4/xfs (a volume mount, e.g. -v /nvme/kv:/cache) "
                         "or set DYNBLOCK_DISABLE_O_DIRECT=1 to accept buffered I/O",
                         value["fallback_reason"] or ""))
    else:
        out.append(Check("o_direct", OK, value, "O_DIRECT"))
    if value["engine"] != "io_uring":
        out.append(Check("io_uring", WARN, value["engine"], "io_uring for the disk tier",
                         "allow io_uring (sysctl kernel.io_uring_disabled=0; a container runtime's "
                         "seccomp profile may block io_uring_setup)",
                         "the disk tier runs on its worker pool: about twice the CPU per GiB"))
    else:
        out.append(Check("io_uring", OK, "io_uring", "io_uring for the disk tier"))
    if value["preallocation"] != "fallocate":
        out.append(Check("fallocate", WARN, value["preallocation"], "fallocate",
                         "use a filesystem with fallocate (ext4, xfs)",
                         "space is reserved by writing zeros, which is slow for large tiers"))
    else:
        out.append(Check("fallocate", OK, "fallocate", "fallocate"))
    if volatile:
        out.append(Check("cache_fs", WARN, fs, "a disk-backed filesystem",
                         "mount a volume (docker -v /nvme/kv:/cache; Kubernetes: a hostPath or PVC)",
                         f"{directory} is on {fs}: the 'disk' tier would use memory"))
    if disk_bytes:
        if free is None:
            out.append(Check("disk_space", WARN, None, f">= {_gib(disk_bytes)}", "",
                             f"{fs} reports no capacity"))
        elif free < disk_bytes:
            out.append(Check("disk_space", FAIL, free, f">= {_gib(disk_bytes)} free",
                             f"free {_gib(disk_bytes - free)} in {directory} or choose a bigger volume"))
        else:
            out.append(Check("disk_space", OK, free, f">= {_gib(disk_bytes)} free"))
    return out


def _numa_probe(sysfs_root: str) -> Optional[str]:
    try:
        h = _core.HostStorage(1, 4096, numa_node=0, pin=False, huge_pages=False, sysfs_root=sysfs_root)
        p = h.policy
        h.close()
        return p
    except Exception:
        return None


def run_checks(
    *,
    directory: Optional[str] = None,
    gpu: Optional[int] = None,
    host_bytes: int = 0,
    disk_bytes: int = 0,
    shm_bytes: Optional[int] = None,
    nvidia_smi: str = "nvidia-smi",
    sysfs_root: str = "/sys",
    dev_root: str = "/dev",
) -> List[Check]:
    """All checks for the given configuration, as Check records."""
    import tempfile

    directory = directory or tempfile.gettempdir()
    probe = _numa_probe(sysfs_root)
    checks: List[Check] = []
    steps: List[Callable[[], Any]] = [
        lambda: check_shm(shm_bytes),
        lambda: check_memlock(host_bytes),
        check_nofile,
        check_stack,
        check_ipc,
        lambda: check_capabilities(probe),
        lambda: check_cgroup_memory(host_bytes),
        lambda: check_numa(sysfs_root),
        lambda: check_gpus(gpu, nvidia_smi, sysfs_root, dev_root),
        lambda: check_cache_dir(directory, disk_bytes),
    ]
    for step in steps:
        try:
            r = step()
        except Exception as e:  # never crash: report
            r = Check(getattr(step, "__name__", "check"), WARN, None, "", "",
                      f"the check itself failed: {type(e).__name__}: {e}")
        checks.extend(r if isinstance(r, list) else [r])
    return checks


def suggest_docker(checks: List[Check]) -> str:
    flags: List[str] = []
    for c in checks:
        if c.status == FAIL:
            flags += [f for f in c.docker if f not in flags]
    rec: List[str] = []
    for c in checks:
        if c.status == WARN:
            rec += [f for f in c.docker if f not in flags and f not in rec]
    lines = ["docker run " + " ".join(flags) + " ..." if flags else "# nothing fails: no flags needed"]
    if rec:
        lines.append("# also recommended (warnings): " + " ".join(rec))
    return "\n".join(lines)


def suggest_k8s(checks: List[Check]) -> str:
    bad = [c for c in checks if c.status in (FAIL, WARN)]
    caps: List[str] = []
    shm = None
    mem = None
    gpus = None
    host_ipc = False
    for c in bad:
        caps += [x for x in c.k8s.get("capabilities", []) if x not in caps]
        shm = c.k8s.get("shm_bytes", shm)
        mem = c.k8s.get("memory_bytes", mem)
        gpus = c.k8s.get("gpus", gpus)
        host_ipc = host_ipc or c.k8s.get("hostIPC", False)
    y = ["# pod spec fragment for the checks that fail or warn"]
    if host_ipc:
        y.append("hostIPC: true")
    y += ["containers:", "- name: engine"]
    if mem or gpus:
        y += ["  resources:", "    limits:"]
        if mem:
            y.append(f"      memory: {mem // GiB}Gi")
        if gpus:
            y.append(f"      nvidia.com/gpu: {gpus}")
    if caps:
        y += ["  securityContext:", "    capabilities:", "      add: [" + ", ".join(caps) + "]"]
    if shm:
        y += ["  volumeMounts:", "  - name: dshm", "    mountPath: /dev/shm",
              "volumes:", "- name: dshm", "  emptyDir:", "    medium: Memory",
              f"    sizeLimit: {-(-shm // GiB)}Gi"]
    if any(c.name == "memlock" for c in bad):
        y.append("# memlock: Kubernetes has no ulimit field; add IPC_LOCK (above) or raise the "
                 "container runtime's default (containerd/CRI-O: LimitMEMLOCK=infinity)")
    return "\n".join(y)


def format_table(checks: List[Check]) -> str:
    rows = [("status", "check", "value", "required", "fix / detail")]
    for c in checks:
        v = c.value
        if isinstance(v, dict):
            v = ", ".join(f"{k}={x}" for k, x in v.items() if k != "nodes")
        note = c.fix or c.detail
        if c.fix and c.detail:
            note = f"{c.fix} ({c.detail})"
        rows.append((c.status.upper(), c.name, str(v)[:70], c.required[:48], note))
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    return "\n".join(
        "  ".join(str(x).ljust(w) for x, w in zip(r[:4], widths)) + "  " + r[4] for r in rows
    ).rstrip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dynblock.doctor",
                                description="Check this container's limits for a dynblock deployment.")
    p.add_argument("--config-from-env", action="store_true",
                   help="take sizes, cache dir and GPU from DYNBLOCK_* / DYN_KVBM_* variables")
    p.add_argument("--dir", help="cache directory of the disk tier (default: the temp dir)")
    p.add_argument("--gpu", type=int, help="CUDA ordinal the engine will use")
    p.add_argument("--host-gib", type=float, default=0.0, help="host tier size in GiB")
    p.add_argument("--disk-gib", type=float, default=0.0, help="disk tier size in GiB")
    p.add_argument("--shm-gib", type=float, help="shared host pool in /dev/shm, GiB")
    p.add_argument("--nvidia-smi", default="nvidia-smi", help=argparse.SUPPRESS)
    p.add_argument("--sysfs-root", default="/sys", help=argparse.SUPPRESS)
    p.add_argument("--dev-root", default="/dev", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--suggest", choices=("docker", "k8s"), help="print the flags/spec that fix what fails")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    for name in ("host_gib", "disk_gib", "shm_gib"):
        v = getattr(a, name)
        if v is not None and not (math.isfinite(v) and 0 <= v <= 2**40):
            p.error(f"--{name.replace('_', '-')} must be a finite number of GiB between 0 and "
                    f"{2**40}, got {v}")
    if a.gpu is not None and a.gpu < 0:
        p.error("--gpu must be >= 0")
    host_bytes = int(a.host_gib * GiB)
    disk_bytes = int(a.disk_gib * GiB)
    directory, gpu = a.dir, a.gpu
    if a.config_from_env:
        from ._env import EnvError
        from .config import Config

        try:
            try:
                cfg = Config.from_env()
            except EnvError as e:
                if "no block size" not in str(e):
                    raise
                # No block size configured: sizes in whole blocks of a nominal 1 MiB.
                cfg = Config.from_env(block_size=1 << 20)
        except (EnvError, ValueError) as e:
            p.error(f"--config-from-env: {e}")
        host_bytes = host_bytes or int(cfg.host_bytes or 0)
        disk_bytes = disk_bytes or int(cfg.disk_bytes or 0)
        directory = directory or cfg.disk_dir
        gpu = gpu if gpu is not None else cfg.gpu
    checks = run_checks(directory=directory, gpu=gpu, host_bytes=host_bytes, disk_bytes=disk_bytes,
                        shm_bytes=int(a.shm_gib * GiB) if a.shm_gib else None,
                        nvidia_smi=a.nvidia_smi, sysfs_root=a.sysfs_root, dev_root=a.dev_root)
    failed = any(c.status == FAIL for c in checks)
    if a.json:
        print(json.dumps({
            "ok": not failed,
            "config": {"dir": directory, "gpu": gpu, "host_bytes": host_bytes, "disk_bytes": disk_bytes},
            "checks": [{k: c.as_dict()[k] for k in ("name", "status", "value", "required", "fix", "detail")}
                       for c in checks],
        }, indent=2, default=str))
    elif a.suggest == "docker":
        print(suggest_docker(checks))
    elif a.suggest == "k8s":
        print(suggest_k8s(checks))
    else:
        print(format_table(checks))
        n = {s: sum(c.status == s for c in checks) for s in (OK, WARN, FAIL)}
        print(f"\n{n[OK]} ok, {n[WARN]} warn, {n[FAIL]} fail")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
