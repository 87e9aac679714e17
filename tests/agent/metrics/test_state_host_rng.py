"""A measurement leaves numpy's and Python's random streams as it found them: a forward that
draws with them (a DDPM's t and ε drawn with numpy) is run by the measurements many times, and
before, each run took draws from the training's own stream (the training then saw other noise
than it would have without the agent)."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from stiffmon_agent.metrics.state import measurement_mode


def test_numpy_and_python_draws_inside_a_measurement_are_undone() -> None:
    model = nn.Linear(2, 1)
    np.random.seed(3)
    random.seed(3)
    expected = (np.random.rand(), random.random())
    np.random.seed(3)
    random.seed(3)
    with measurement_mode(model):
        np.random.rand(5)
        random.random()
        torch.rand(2)
    assert (np.random.rand(), random.random()) == expected


def test_they_are_undone_when_the_measurement_raises() -> None:
    np.random.seed(4)
    expected = np.random.rand()
    np.random.seed(4)
    try:
        with measurement_mode(nn.Linear(2, 1)):
            np.random.rand(3)
            raise RuntimeError("a failing forward")
    except RuntimeError:
        pass
    assert np.random.rand() == expected
