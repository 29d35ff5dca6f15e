"""The package as users get it: typed, release-built, importable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import dynblock


def test_public_api_is_exported() -> None:
    for name in dynblock.__all__:
        assert hasattr(dynblock, name), name
    assert issubclass(dynblock.CapacityError, dynblock.DynblockError)
    assert issubclass(dynblock.EnvError, ValueError)


def test_typed_package_markers() -> None:
    pkg = Path(dynblock.__file__).parent
    assert (pkg / "py.typed").exists()
    assert (pkg / "_core.pyi").exists()


def test_stubs_match_the_native_module() -> None:
    pytest.importorskip("mypy")
    allowlist = Path(__file__).resolve().parent.parent / ".ci" / "stubtest-allowlist"
    r = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "dynblock._core", "--allowlist", str(allowlist)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_package_type_checks() -> None:
    pytest.importorskip("mypy")
    # Check the package sources in this checkout (what `pip install .` ships) with the
    # configuration in pyproject.toml ([tool.mypy]: optional extras such as matplotlib may be
    # absent). Pointing mypy at the installed copy fails outside a venv: site-packages becomes a
    # source root and every top-level module there (typing_extensions.py) "shadows" a library.
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--config-file",
         str(root / "pyproject.toml")],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_installed_build_is_release() -> None:
    # Benchmarks and speed claims are only valid for release builds.
    assert dynblock._core.build_profile() == "release"


def test_readme_opens_with_the_two_commands() -> None:
    readme = Path(__file__).resolve().parent.parent / "README.md"
    text = readme.read_text()
    blocks = [b for b in text.split("```") if b.startswith("sh\n") or b.startswith("bash\n")]
    assert len(blocks) >= 2
    assert "python -m dynblock.bench" in blocks[0] or "python3 -m dynblock.bench" in blocks[0]
    assert "pytest" in blocks[1] and "cargo test" in blocks[1]
    ci = (readme.parent / ".ci" / "run").read_text()
    test_cmd = blocks[1].split("\n", 1)[1].strip()
    assert test_cmd in ci, "the CI script must run the README's test command"


def test_readme_examples_run(tmp_path: Path) -> None:
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 2
    ns: dict = {}
    for code in blocks:
        if "vllm" in code or "remote=" in code:
            continue  # checked by tests/test_vllm_parts.py and tests/test_remote.py

        code = code.replace("/mnt/nvme", str(tmp_path)).replace("16384", "64").replace("1024", "16")
        exec(compile(code, "README.md", "exec"), ns)
    ns["kv"].close()
