"""stiffmon_agent: the in-loop agent that measures stiffness, sharpness and gradient noise.

Installed with ``pip install "stiffmon[agent]"``; needs torch. The metric functions live in
:mod:`stiffmon_agent.metrics` as pure functions on tensors.
"""

from __future__ import annotations

from stiffmon import __version__
from stiffmon_agent.agent import Agent
from stiffmon_agent.schedules import EveryK, FirstNThenEveryK, LogSpaced, Never, parse_schedule

__all__ = [
    "Agent",
    "EveryK",
    "FirstNThenEveryK",
    "LogSpaced",
    "Never",
    "__version__",
    "parse_schedule",
]
