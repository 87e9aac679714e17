"""A run's series as a chart line that knows when its values stop being current.

The cursor read-out shows a line's latest value at or before the cursor only while it is still
current: not past the run's last step, and not once the run diverged or the measurement that
produced it was skipped because the model was not finite (see
:meth:`stiffmon.store.RunData.stale_steps`). Pure: no Textual here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from stiffmon.store import RunData
from stiffmon.tui.renderables import Line
from stiffmon.tui.renderables.chart_items import TAGS

# which measurement produces a scalar, by the first part of its name
KIND_OF = {
    "sharpness": "sharpness",
    "stiffness": "gram",
    "layer-stiffness": "gram",
    "noise": "gram",
    "xi": "gram",
    "curvature": "density",
}


def kind_of(name: str) -> str | None:
    """The measurement kind (gram, sharpness, density) of scalar ``name``; None: per step."""
    return KIND_OF.get(name.split("/", 1)[0])


def run_end(rd: RunData, x_time: bool) -> float:
    """The run's last step (or its last time, seconds since its start) on the x axis."""
    end = (rd.last_t - rd.first_t) if x_time else float(rd.last_step)
    return end if math.isfinite(end) else math.inf


def series_x(rd: RunData, steps: np.ndarray, times: np.ndarray, x_time: bool) -> np.ndarray:
    """A series' points on the x axis: their steps, or seconds since the run's start."""
    return (times - rd.first_t) if x_time else steps.astype(np.float64)


def span_of(runs: Sequence[RunData], x_time: bool) -> tuple[float, float] | None:
    """(0, the last run end) on the x axis: what charts of these runs span; None: unknown."""
    ends = [e for rd in runs if math.isfinite(e := run_end(rd, x_time))]
    return (0.0, max(ends)) if ends else None


def steps_to_x(rd: RunData, steps: Sequence[int], x_time: bool) -> tuple[float, ...]:
    """``steps`` on the x axis: themselves, or their wall time read off the densest series."""
    if not x_time or not steps:
        return tuple(float(s) for s in steps)
    ref = max(rd.scalars.values(), key=len, default=None)
    if ref is None or not len(ref):
        return ()
    x = np.interp(np.asarray(steps, dtype=np.float64), ref.steps, ref.times - rd.first_t)
    return tuple(float(v) for v in x)


def run_tag(rd: RunData) -> str:
    """A run's tag where colours cannot be shown (``1``…``9``, ``a``…``z`` by order of
    appearance, as its colour is): its curves, read-out values and run-list row carry it."""
    return TAGS[rd.index % len(TAGS)]


def run_line(
    rd: RunData,
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    color: str,
    label: str,
    *,
    x_time: bool,
) -> Line:
    """Series ``name`` of ``rd`` as a line that ends at the run's end and goes stale."""
    stale = steps_to_x(rd, rd.stale_steps(kind_of(name)), x_time)
    return Line(x, y, color, label, end=run_end(rd, x_time), stale=stale, tag=run_tag(rd))
