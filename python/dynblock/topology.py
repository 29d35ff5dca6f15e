"""Which NUMA node is nearest a GPU: ``nvidia-smi topo -m`` and sysfs.

Pure parsing functions plus one resolver that runs ``nvidia-smi``. Nothing
here guesses: when the node cannot be known, the answer is ``None`` and the
reason says why.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

__all__ = [
    "GpuTopology",
    "GpuResolution",
    "parse_nvidia_smi_topo",
    "parse_cpu_list",
    "parse_query_gpu",
    "visible_gpu",
    "resolve_gpu",
    "numa_node_for_gpu",
]

_MULTIWORD = {
    "CPU Affinity": "CPU_AFFINITY",
    "NUMA Affinity": "NUMA_AFFINITY",
    "GPU NUMA ID": "GPU_NUMA_ID",
}
_TRAILING = ("CPU_AFFINITY", "NUMA_AFFINITY", "GPU_NUMA_ID")
# Cells of the connection matrix: X (self), NV#, and the PCIe/SMP levels.
_LINK = re.compile(r"^(X|NV\d+|SYS|NODE|PHB|PXB|PIX|SOC|PHB\d*|C2C|N/A)$")
_GPU_LABEL = re.compile(r"^GPU(\d+)$")
_NOT_KNOWN = {"N/A", "NA", "", "-1", "-"}
# Far above any real machine (Linux allows at most 8192 CPUs and 1024 nodes):
# a larger id means the text is malformed, not that a huge list is wanted.
MAX_CPU_ID = 1 << 16
MAX_NODE_ID = 1023


@dataclass(frozen=True)
class GpuTopology:
    """One GPU row of ``nvidia-smi topo -m``."""

    index: int
    numa_node: Optional[int]
    cpu_affinity: List[int] = field(default_factory=list)
    gpu_numa_id: Optional[int] = None


def parse_cpu_list(text: str) -> List[int]:
    """``0-47,96-143`` -> [0..47, 96..143]; ``N/A`` or empty -> []."""
    t = text.strip()
    if t.upper() in _NOT_KNOWN:
        return []
    out: List[int] = []
    for part in t.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", part)
        if not m:
            raise ValueError(f"not a CPU list: {text!r}")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if b < a:
            raise ValueError(f"not a CPU list (range {part!r} runs backwards): {text!r}")
        if b > MAX_CPU_ID:
            raise ValueError(f"not a plausible CPU list (CPU {b} > {MAX_CPU_ID}): {text[:80]!r}")
        out.extend(range(a, b + 1))
    return out


def _opt_int(cell: Optional[str], what: str, text_line: str) -> Optional[int]:
    if cell is None or cell.strip().upper() in _NOT_KNOWN:
        return None
    if not re.fullmatch(r"-?[0-9]+", cell.strip()):
        raise ValueError(f"{what} {cell!r} is not a number in line {text_line!r}")
    v = int(cell.strip())
    if v > MAX_NODE_ID:
        raise ValueError(f"{what} {v} is not a plausible NUMA node (> {MAX_NODE_ID}) in line {text_line!r}")
    return v if v >= 0 else None


#: Terminal control sequences (CSI), such as the underline around the header.
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _tokens(line: str) -> List[str]:
    for words, token in _MULTIWORD.items():
        line = line.replace(words, token)
    return line.split()


def parse_nvidia_smi_topo(text: str) -> Dict[int, GpuTopology]:
    """Parse the output of ``nvidia-smi topo -m`` into GPU index -> record.

    Reads the variants seen in the field: NIC columns (``NIC0``, ``mlx5_0``)
    and NIC rows with empty affinity, with or without the ``NUMA Affinity`` and
    ``GPU NUMA ID`` columns, ``N/A`` values, ``X`` or `` X `` cells, tabs or
    padding spaces, CPU lists such as ``0-47,96-143``, legend blocks,
    leading comment or warning lines and terminal escapes (an underlined
    header). Raises ``ValueError`` on text that is
    not such a table.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    # Drivers underline the header with terminal escapes (ESC[4m ... ESC[0m), also into a pipe.
    text = _ESCAPES.sub("", text)
    header: Optional[List[str]] = None
    result: Dict[int, GpuTopology] = {}
    for raw in text.splitlines():
        line = raw.rstrip()
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.lower().startswith("legend") or stripped.lower().startswith("nic legend"):
            if header is not None:
                break
            continue
        toks = _tokens(line)
        if header is None:
            if "GPU0" in toks and "X" not in toks:
                header = toks
            continue
        label = toks[0]
        m = _GPU_LABEL.match(label)
        if not m:
            continue  # NIC rows, CPU rows and anything else that is not a GPU
        devices = [h for h in header if h not in _TRAILING]
        trailing = [h for h in header if h in _TRAILING]
        cells = toks[1:]
        if len(cells) < len(devices):
            raise ValueError(
                f"GPU row has {len(cells)} cells but the header names {len(devices)} devices: "
                f"{stripped!r}"
            )
        for c in cells[: len(devices)]:
            if not _LINK.match(c):
                raise ValueError(f"unexpected connection type {c!r} in row {stripped!r}")
        rest = cells[len(devices) :]
        if len(rest) > len(trailing):
            raise ValueError(f"row has more columns than the header: {stripped!r}")
        values = dict(zip(trailing, rest))
        idx = int(m.group(1))
        cpus = parse_cpu_list(values.get("CPU_AFFINITY", ""))
        result[idx] = GpuTopology(
            index=idx,
            numa_node=_opt_int(values.get("NUMA_AFFINITY"), "NUMA affinity", stripped),
            cpu_affinity=cpus,
            gpu_numa_id=_opt_int(values.get("GPU_NUMA_ID"), "GPU NUMA ID", stripped),
        )
    if header is None:
        raise ValueError(
            "not `nvidia-smi topo -m` output: no header line naming GPU0 was found"
        )
    if not result:
        raise ValueError("`nvidia-smi topo -m` output has a header but no GPU rows")
    return result


@dataclass(frozen=True)
class GpuInfo:
    index: int
    uuid: str
    pci_bus_id: str


def parse_query_gpu(text: str) -> List[GpuInfo]:
    """Parse ``nvidia-smi --query-gpu=index,uuid,pci.bus_id --format=csv,noheader``."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3 or not re.fullmatch(r"[0-9]+", parts[0]):
            raise ValueError(f"unexpected nvidia-smi --query-gpu line: {line!r}")
        out.append(GpuInfo(int(parts[0]), parts[1], parts[2]))
    return out


def _sysfs_bdf(bus_id: str) -> str:
    """nvidia-smi's ``00000000:17:00.0`` -> sysfs's ``0000:17:00.0``."""
    b = bus_id.strip().lower()
    dom, _, rest = b.partition(":")
    if rest and len(dom) > 4:
        dom = dom[-4:]
    return f"{dom}:{rest}" if rest else b


def visible_gpu(
    device: int, gpus: Sequence[GpuInfo], cuda_visible_devices: Optional[str]
) -> Optional[GpuInfo]:
    """Map a CUDA ordinal to a physical GPU through ``CUDA_VISIBLE_DEVICES``.

    Entries are physical indices (ASCII digits) or ``GPU-<uuid>`` (prefixes
    allowed, as CUDA does). Returns None for entries that cannot be mapped
    (``MIG-`` ids). Raises ``ValueError`` naming the variable when the
    ordinal is not visible or the variable holds what CUDA itself refuses
    (other characters, an empty ``GPU-`` prefix, one GPU named twice).
    """
    if isinstance(device, bool) or not isinstance(device, int) or device < 0:
        raise ValueError(f"device must be a non-negative CUDA ordinal, got {device!r}")
    if cuda_visible_devices is None:
        entries = [str(g.index) for g in gpus]
    else:
        entries = [e.strip() for e in cuda_visible_devices.split(",") if e.strip()]
        for e in entries:
            ok = re.fullmatch(r"[0-9]+", e) or re.fullmatch(r"(GPU|MIG)-[0-9A-Za-z-]+", e, re.I)
            if not ok:
                raise ValueError(
                    f"CUDA_VISIBLE_DEVICES={cuda_visible_devices!r}: entry {e!r} is not a device "
                    "index (ASCII digits), GPU-<uuid> or MIG-<uuid>; CUDA refuses it too"
                )
        canon = [str(int(e)) if e.isascii() and e.isdigit() else e.upper() for e in entries]
        dup = {e for e in canon if canon.count(e) > 1}
        if dup:
            raise ValueError(
                f"CUDA_VISIBLE_DEVICES={cuda_visible_devices!r} names {sorted(dup)[0]} more than "
                "once; CUDA refuses duplicate devices"
            )
    if device >= len(entries):
        raise ValueError(
            f"CUDA device {device} is not visible: CUDA_VISIBLE_DEVICES="
            f"{cuda_visible_devices!r} makes {len(entries)} device(s) visible"
        )
    entry = entries[device]
    if entry.isdigit():
        want = int(entry)
        for g in gpus:
            if g.index == want:
                return g
        raise ValueError(
            f"CUDA_VISIBLE_DEVICES names GPU {want}, which nvidia-smi does not list "
            f"(it lists {[g.index for g in gpus]})"
        )
    if entry.upper().startswith("GPU-"):
        matches = [g for g in gpus if g.uuid.lower().startswith(entry.lower())]
        if len(matches) == 1:
            return matches[0]
        raise ValueError(
            f"CUDA_VISIBLE_DEVICES entry {entry!r} matches {len(matches)} GPUs; "
            "use a longer UUID prefix"
        )
    return None  # MIG-... and other forms: nothing to map them with here


@dataclass(frozen=True)
class GpuResolution:
    """How a CUDA ordinal was mapped to a NUMA node."""

    device: int
    physical_index: Optional[int]
    pci_bus_id: Optional[str]
    topo_numa_node: Optional[int]
    sysfs_numa_node: Optional[int]
    numa_node: Optional[int]
    reason: str


def _run(cmd: List[str], timeout: float) -> Optional[str]:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                           timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    return r.stdout


def resolve_gpu(
    device: int,
    *,
    nvidia_smi: str = "nvidia-smi",
    sysfs_root: str = "/sys",
    env: Optional[Mapping[str, str]] = None,
    timeout: float = 10.0,
) -> GpuResolution:
    """Resolve CUDA ordinal ``device`` to its nearest NUMA node, with reasons."""
    e = os.environ if env is None else env
    exe = nvidia_smi if os.sep in nvidia_smi else shutil.which(nvidia_smi, path=e.get("PATH"))

    def unknown(why: str, **kw: Any) -> GpuResolution:
        base: Dict[str, Any] = dict(
            device=device, physical_index=None, pci_bus_id=None, topo_numa_node=None,
            sysfs_numa_node=None, numa_node=None, reason=why,
        )
        base.update(kw)
        return GpuResolution(**base)

    if exe is None or not os.path.exists(exe):
        return unknown(f"{nvidia_smi} not found: cannot tell which NUMA node is nearest the GPU")
    q = _run([exe, "--query-gpu=index,uuid,pci.bus_id", "--format=csv,noheader"], timeout)
    if q is None:
        return unknown(f"{exe} --query-gpu failed or timed out")
    try:
        gpus = parse_query_gpu(q)
    except ValueError as err:
        return unknown(f"{exe} --query-gpu printed what this parser does not know ({err}); "
                       "not guessing")
    if not gpus:
        return unknown(f"{exe} lists no GPUs ({q.strip()[:80]!r}): nothing to be near")
    g = visible_gpu(device, gpus, e.get("CUDA_VISIBLE_DEVICES"))
    if g is None:
        return unknown(
            f"CUDA_VISIBLE_DEVICES entry for device {device} cannot be mapped to a physical GPU"
        )
    topo_node: Optional[int] = None
    topo = _run([exe, "topo", "-m"], timeout)
    if topo is not None:
        try:
            rec = parse_nvidia_smi_topo(topo).get(g.index)
        except ValueError as err:
            return unknown(f"{exe} topo -m printed what this parser does not know ({err}); "
                           "not guessing", physical_index=g.index, pci_bus_id=g.pci_bus_id)
        topo_node = rec.numa_node if rec else None
    sys_node: Optional[int] = None
    p = os.path.join(sysfs_root, "bus/pci/devices", _sysfs_bdf(g.pci_bus_id), "numa_node")
    try:
        with open(p) as f:
            raw = f.read().strip()
        v = int(raw) if re.fullmatch(r"-?[0-9]+", raw) else -1
        sys_node = v if 0 <= v <= MAX_NODE_ID else None
    except (OSError, UnicodeDecodeError):
        pass
    kw: Dict[str, Any] = dict(physical_index=g.index, pci_bus_id=g.pci_bus_id,
              topo_numa_node=topo_node, sysfs_numa_node=sys_node)
    if topo_node is not None and sys_node is not None and topo_node != sys_node:
        return unknown(
            f"nvidia-smi says node {topo_node} but {p} says {sys_node}; not guessing", **kw
        )
    node = topo_node if topo_node is not None else sys_node
    if node is None:
        return unknown("neither nvidia-smi topo -m nor sysfs names a NUMA node (N/A or -1)", **kw)
    if topo_node is not None and sys_node is not None:
        src = "nvidia-smi topo -m, confirmed by sysfs"
    elif topo_node is not None:
        src = "nvidia-smi topo -m"
    else:
        src = "sysfs"
    return GpuResolution(device=device, numa_node=node, reason=f"from {src}", **kw)


def numa_node_for_gpu(
    device: int,
    *,
    nvidia_smi: str = "nvidia-smi",
    sysfs_root: str = "/sys",
    env: Optional[Mapping[str, str]] = None,
    timeout: float = 10.0,
) -> Optional[int]:
    """The NUMA node nearest CUDA device ``device`` (an ordinal, after
    ``CUDA_VISIBLE_DEVICES``), or None when it cannot be known."""
    return resolve_gpu(
        device, nvidia_smi=nvidia_smi, sysfs_root=sysfs_root, env=env, timeout=timeout
    ).numa_node
