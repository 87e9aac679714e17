"""SVG snapshots of every view at 80×24 and 160×45 from the fixed synthetic session.

Update after an intended change with ``pytest tests/stiffmon/tui/test_snapshots.py
--snapshot-update`` and look at the report before committing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stiffmon.tui.app import StiffmonApp
from stiffmon.tui.sources import ReplaySource
from tests.stiffmon.tui.fixtures import write_sessions

VIEWS = {
    "1": "overview",
    "2": "stiffness",
    "3": "distance",
    "4": "sharpness",
    "5": "noise",
    "6": "compare",
    "7": "training",
    "8": "layers",
    "9": "spectra",
    "0": "custom",
    "g": "log",
}


@pytest.mark.parametrize("size", [(80, 24), (160, 45)], ids=["80x24", "160x45"])
@pytest.mark.parametrize("key", sorted(VIEWS), ids=[VIEWS[k] for k in sorted(VIEWS)])
def test_view_snapshot(snap_compare: Any, tmp_path: Path, key: str, size: tuple[int, int]) -> None:
    src = ReplaySource(write_sessions(tmp_path), at_end=True)
    src.load()
    app = StiffmonApp(replay=src, clock=lambda: 0.0)
    assert snap_compare(app, terminal_size=size, press=[key])


def test_run_health_snapshot(snap_compare: Any) -> None:
    """A diverged run, a run that lost a metric and skipped measurements, a stalled run."""
    from tests.stiffmon.tui.fixtures import troubled_store

    app = StiffmonApp(store=troubled_store(), clock=lambda: 20.0)
    assert snap_compare(app, terminal_size=(80, 24))
