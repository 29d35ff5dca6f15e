"""The separate environment the engine tests run in (`.ci/vllm-env` builds
`.venv-vllm`; `.ci/sglang-env` adds SGLang to it): finding it, and checking
that it runs this checkout's dynblock."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Dict

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-vllm"
_FRESH: Dict[str, bool] = {}


def check_fresh(py: str, rebuild: str) -> None:
    """Fails when ``py``'s dynblock differs from this checkout's Python files
    (``rebuild``: the command that refreshes it)."""
    if py in _FRESH:
        return
    r = subprocess.run([py, "-c", "import dynblock, os; print(os.path.dirname(dynblock.__file__))"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"dynblock does not import in {py}: {r.stderr[-2000:]}"
    installed = Path(r.stdout.strip().splitlines()[-1])
    src = ROOT / "python" / "dynblock"
    stale = [str(p.relative_to(src)) for p in src.rglob("*.py")
             if not (installed / p.relative_to(src)).exists()
             or (installed / p.relative_to(src)).read_bytes() != p.read_bytes()]
    assert not stale, (f"the engine environment's dynblock ({installed}) is older than this "
                       f"checkout ({', '.join(stale[:5])} differ): run `{rebuild}`")
    _FRESH[py] = True
