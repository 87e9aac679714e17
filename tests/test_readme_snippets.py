"""The README's Lightning snippet, run as written, measures what it asks for.

A stranger copies the snippet, runs it and then `stiffmon summary lightning.stiff`: the
snippet sets ``sharpness_every=20``, so the run must hold λ1_H measurements (on this fast toy
loop the default 2 % overhead cap skipped every one of them).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning")
pytest.importorskip("sklearn")

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet(marker: str) -> str:
    """The README's ```python block that contains ``marker``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"expected one README snippet with {marker!r}, got {len(found)}"
    return found[0]


@pytest.mark.slow
def test_lightning_snippet_measures_sharpness(tmp_path: Path) -> None:
    code = _snippet("integrations.lightning import StiffmonCallback")
    (tmp_path / "snippet.py").write_text(code, encoding="utf-8")
    env = dict(os.environ, STIFFMON_REGISTRY=str(tmp_path / "registry"))
    run = subprocess.run(
        [sys.executable, "snippet.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = subprocess.run(
        [sys.executable, "-m", "stiffmon", "summary", "lightning.stiff", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert summary.returncode == 0, summary.stderr
    (row,) = json.loads(summary.stdout)
    assert row["steps"] == 30  # 2 epochs of 15 optimizer steps (accumulate_grad_batches=2)
    assert row["threshold"] == pytest.approx(2 / 0.1)
    assert row["peak_lambda1_h"] is not None, "the snippet's run made no sharpness measurement"
