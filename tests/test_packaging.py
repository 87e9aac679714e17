"""The regular wheel holds both import packages, their py.typed markers and the console script."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contents(tmp_path: Path) -> None:
    pytest.importorskip("hatchling")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("stiffmon-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "stiffmon/__init__.py",
        "stiffmon/protocol/__init__.py",
        "stiffmon/protocol/codec.py",
        "stiffmon/session/__init__.py",
        "stiffmon/session/reader.py",
        "stiffmon/py.typed",
        "stiffmon_agent/__init__.py",
        "stiffmon_agent/py.typed",
    ):
        assert required in names, required
    assert not any(n.startswith(("agent/", "tests/")) for n in names)
    (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "stiffmon = stiffmon.cli:main" in text
