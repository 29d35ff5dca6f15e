"""The bench's own code paths at tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dynblock import bench


def test_parse_size() -> None:
    assert bench.parse_size("2MiB") == 2 << 20
    assert bench.parse_size("64k") == 64 << 10
    assert bench.parse_size("4096") == 4096
    with pytest.raises(Exception):
        bench.parse_size("lots")


def test_json_run_in_a_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    r = subprocess.run(
        [sys.executable, "-m", "dynblock.bench", "--json", "--dir", str(tmp_path),
         "--block-size", "64KiB", "--blocks", "8", "--batch", "4", "--repeat", "2",
         "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data == json.loads(out.read_text())
    assert data["machine"]["filesystem"] and data["machine"]["kernel"]
    cases = data["cases"]
    impls = {(c["impl"], c["op"]) for c in cases}
    assert ("python-naive", "read") in impls and ("dynblock-o_direct", "write") in impls
    by = {(c["impl"], c["op"]): c for c in cases}
    for c in cases:
        assert len(c["gib_s"]) == 2 and c["min_gib_s"] <= c["median_gib_s"] <= c["max_gib_s"]
        if c["impl"].startswith("dynblock"):
            base = by[("python-naive", c["op"])]["median_gib_s"]
            assert c["ratios"]["vs_python_naive"] == pytest.approx(c["median_gib_s"] / base)
    # nothing left in the directory
    assert sorted(os.listdir(tmp_path)) == ["r.json"]


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "dynblock.bench", "--blocks", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--blocks" in r.stderr
    r = subprocess.run([sys.executable, "-m", "dynblock.bench", "--dir", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not a directory" in r.stderr
