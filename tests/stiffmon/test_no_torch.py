"""The monitor package must never import torch (DESIGN §2)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import stiffmon


def test_every_stiffmon_module_imports_without_torch() -> None:
    names = [m.name for m in pkgutil.walk_packages(stiffmon.__path__, "stiffmon.")]
    names = [n for n in names if n != "stiffmon.__main__"]
    code = (
        "import sys, importlib; sys.modules['torch'] = None\n"
        f"for n in {names!r}: importlib.import_module(n)\n"
        "assert 'torch' not in [k for k, v in sys.modules.items() if v is not None]\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
