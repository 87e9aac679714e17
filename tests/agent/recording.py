"""Record training steps with an :class:`~stiffmon_agent.Agent` and read back what it wrote.

The agent tests share one loop: an agent that records to a file and publishes nowhere, one
optimizer step θ ← step(θ, ∇_θ L) on the training loss L followed by ``agent.step(L, ...)``,
then ``agent.close()`` and the session read back from the ``record=`` file, where a test picks
out the values of a scalar (the last one: the measurement at the last due step) and the events
of one code. These helpers hold that loop; what each test measures and checks stays in it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from stiffmon import protocol as p
from stiffmon.session import read_session
from stiffmon_agent import Agent

EVERY_STEP: dict[str, Any] = {"gram_every": 1, "sharpness_every": 1, "overhead_cap": None}
"""Measure the Gram and the sharpness at every step, whatever the time they take."""

EXACT: dict[str, Any] = EVERY_STEP | {"hessian_tol": 1e-10, "max_hvps": 200}
"""As :data:`EVERY_STEP`, the top eigenvalue to the tolerance of a float64 reference."""


def offline_agent(
    model: nn.Module, loss_fn: Any, opt: torch.optim.Optimizer | None, rec: Path, **settings: Any
) -> Agent:
    """An agent that records to ``rec`` and publishes nowhere (no endpoint, no registry).

    Args:
        model: The model it measures.
        loss_fn: The per-example loss it measures with.
        opt: The training loop's optimizer.
        rec: The session file it records to.
        **settings: Any other :class:`~stiffmon_agent.Agent` arguments (probe, schedules, …).

    Returns:
        The agent, not yet stepped.
    """
    return Agent(model, loss_fn, opt, endpoint="", record=rec, registry=False, **settings)


def train_step(agent: Agent, opt: torch.optim.Optimizer, loss: torch.Tensor, *seen: Any) -> None:
    """One training step: zero the gradients, ∇_θ L by backward, the optimizer's step, then
    ``agent.step(loss, *seen)``.

    Args:
        agent: The agent told of the step.
        opt: The optimizer that takes it.
        loss: The training loss L of the step (a scalar with a graph to the parameters).
        *seen: What the agent's step takes after the loss (the outputs and targets).
    """
    opt.zero_grad()
    loss.backward()
    opt.step()
    agent.step(loss, *seen)


def close_and_read(agent: Agent, rec: Path) -> list[Any]:
    """Close ``agent`` and return the messages of the first session recorded in ``rec``.

    Args:
        agent: The agent recording to ``rec``.
        rec: Its session file.

    Returns:
        The messages, in the order they were recorded.
    """
    agent.close()
    return read_session(rec)[0]


def scalar_values(msgs: list[Any], name: str) -> list[float]:
    """Every recorded value of the scalar ``name``, in step order.

    Args:
        msgs: The recorded messages.
        name: The scalar's name (``"sharpness/lambda1_h"``).

    Returns:
        The values; empty when none was recorded.
    """
    return [float(m.as_dict()[name]) for m in msgs if isinstance(m, p.Scalars) and name in m.names]


def step_rows(msgs: list[Any], name: str = "loss") -> list[tuple[int, float]]:
    """(step, value) of the per-step column ``name`` in every recorded ``columns`` batch (the
    batches whose rows are all there, not the sparse ones), in the order recorded.

    Args:
        msgs: The recorded messages.
        name: The column (default: the loss).

    Returns:
        The rows.
    """
    return [
        (int(s), float(v))
        for m in msgs
        if isinstance(m, p.Columns) and not m.sparse and name in m.names
        for s, v in zip(m.steps, m.values[m.names.index(name)], strict=True)
    ]


def last_scalar(msgs: list[Any], name: str) -> float:
    """The last recorded value of the scalar ``name``.

    Args:
        msgs: The recorded messages.
        name: The scalar's name.

    Returns:
        The value.

    Raises:
        AssertionError: No value of ``name`` was recorded.
    """
    values = scalar_values(msgs, name)
    assert values, f"no {name} was recorded"
    return values[-1]


def events(msgs: list[Any], code: str) -> list[p.Event]:
    """The recorded events of one code.

    Args:
        msgs: The recorded messages.
        code: The event's code (``"metric-error"``).

    Returns:
        The events, in the order they were recorded.
    """
    return [m for m in msgs if isinstance(m, p.Event) and m.code == code]


def metric_errors(msgs: list[Any]) -> dict[str, str]:
    """The ``metric-error`` messages by the metric that failed (the last one of each).

    Args:
        msgs: The recorded messages.

    Returns:
        ``{metric: message}``.
    """
    return {e.attrs["metric"]: e.message for e in events(msgs, "metric-error")}
