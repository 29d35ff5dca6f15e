"""Shared fixtures: real filesystems mounted for the test (root only)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
import sys
import textwrap
from typing import Dict, Iterator, Optional

import pytest


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def _mount(fstype: str, options: str = "") -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip(f"mounting {fstype} needs root (running as uid {os.geteuid()})")
    if shutil.which("mount") is None:
        pytest.skip("the mount command is not installed")
    d = Path(tempfile.mkdtemp(prefix=f"dynblock-{fstype}-"))
    cmd = ["mount", "-t", fstype]
    if options:
        cmd += ["-o", options]
    r = _run(*cmd, fstype, str(d))
    if r.returncode != 0:
        d.rmdir()
        pytest.skip(f"cannot mount {fstype} here: {r.stderr.strip()}")
    try:
        yield d
    finally:
        _run("umount", "-l", str(d))
        d.rmdir()


@pytest.fixture
def ramfs_dir() -> Iterator[Path]:
    """A ramfs mount: a real filesystem that refuses O_DIRECT."""
    yield from _mount("ramfs")


@pytest.fixture
def tiny_tmpfs() -> Iterator[Path]:
    """A 16 MiB tmpfs mount, for running out of space (see :func:`fill_up`)."""
    yield from _mount("tmpfs", "size=16m")


def fill_up(directory: Path) -> Path:
    """Fill the filesystem of `directory` to the last byte with a file of zeros (unbuffered
    writes: a short write takes what is left) and return that file; stops at ENOSPC."""
    import errno

    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return filler


@pytest.fixture
def loop_ext4_4k(tmp_path: Path) -> Iterator[Path]:
    """ext4 on a loop device with 4096-byte logical sectors, so 512-aligned
    direct I/O fails with EINVAL there."""
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    for tool in ("losetup", "mkfs.ext4", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    r = _run("losetup", "--find", "--show", "--sector-size", "4096", str(img))
    if r.returncode != 0:
        pytest.skip(f"cannot set up a loop device here: {r.stderr.strip()}")
    dev = r.stdout.strip()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        r = _run("mkfs.ext4", "-q", "-b", "4096", dev)
        if r.returncode != 0:
            pytest.skip(f"mkfs.ext4 failed: {r.stderr.strip()}")
        r = _run("mount", dev, str(mnt))
        if r.returncode != 0:
            pytest.skip(f"cannot mount the loop device: {r.stderr.strip()}")
        try:
            yield mnt
        finally:
            _run("umount", "-l", str(mnt))
    finally:
        _run("losetup", "-d", dev)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for k in list(os.environ):
        if k.startswith("DYNBLOCK_") or k.startswith("DYN_KVBM_") or k == "DYN_MEMORY_DISABLE_NUMA":
            monkeypatch.delenv(k)
    return monkeypatch


@pytest.fixture(scope="session")
def faultshim(tmp_path_factory) -> Path:
    """tests/faults/faultshim.c built into an LD_PRELOAD library: makes chosen
    I/O calls on chosen files fail (EIO, short writes, SIGKILL) like a failing
    device. Skips when there is no C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (cc) to build the fault-injection shim")
    src = Path(__file__).parent / "faults" / "faultshim.c"
    out = tmp_path_factory.mktemp("shim") / "faultshim.so"
    r = _run(cc, "-shared", "-fPIC", "-O1", "-o", str(out), str(src), "-ldl")
    if r.returncode != 0:
        pytest.skip(f"cannot build the fault-injection shim: {r.stderr.strip()[:300]}")
    return out


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mounts)")

#: What a test subprocess starts with (``run_py``): a 4 KiB block, ``data_for`` and a
#: persistent ``open_store``.
PRELUDE = """
import os, sys
import numpy as np
import dynblock
BS = 4096
def data_for(h):
    return np.random.default_rng(h).integers(0, 256, size=BS, dtype=np.uint8)
def open_store(path, **kw):
    kw.setdefault("disk_blocks", 16)
    return dynblock.BlockManager.open(path, block_size=BS, numa_node=None, pin=False, **kw)
"""


def run_py(code: str, env: Optional[Dict[str, str]] = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``PRELUDE`` + ``code`` in a fresh interpreter (with ``env`` added)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def shim_env(shim: Path, **faults: object) -> Dict[str, str]:
    """The environment that makes the fault shim (``faultshim``) fail chosen calls."""
    env = {"LD_PRELOAD": str(shim)}
    env.update({f"FAULT_{k.upper()}": str(v) for k, v in faults.items()})
    return env
