"""The monitor's views, one module each; :data:`VIEWS` in key order."""

from __future__ import annotations

from stiffmon.tui.views.base import ChartView, View, run_color
from stiffmon.tui.views.compare import Compare
from stiffmon.tui.views.custom import Custom
from stiffmon.tui.views.distance import Distance
from stiffmon.tui.views.layers import Layers
from stiffmon.tui.views.log import Log
from stiffmon.tui.views.noise import Noise
from stiffmon.tui.views.overview import Overview
from stiffmon.tui.views.sharpness import Sharpness
from stiffmon.tui.views.spectra import Spectra
from stiffmon.tui.views.stiffness import BLOCKS, Stiffness
from stiffmon.tui.views.training import Training

VIEWS: tuple[type[View], ...] = (
    Overview,
    Stiffness,
    Distance,
    Sharpness,
    Noise,
    Compare,
    Training,
    Layers,
    Spectra,
    Custom,
    Log,
)

__all__ = ["BLOCKS", "VIEWS", "ChartView", "View", "run_color"]
