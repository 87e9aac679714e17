"""Layer activations of a probe batch, for stiffness against distance in representation space."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from stiffmon_agent.metrics.probe import Batch, ForwardFn, default_forward
from stiffmon_agent.metrics.state import measurement_mode


def capture_activations(
    model: nn.Module,
    inputs: Batch,
    layers: Sequence[str],
    *,
    forward: ForwardFn | None = None,
) -> dict[str, Tensor]:
    """Outputs of the named modules for ``inputs``, flattened per example, in eval mode.

    A module called several times contributes the concatenation of its outputs. The model is
    left exactly as it was (:func:`~stiffmon_agent.metrics.state.measurement_mode`).

    Args:
        model: The network.
        inputs: Probe inputs with examples along dim 0.
        layers: Module names as in ``model.named_modules()``.
        forward: ``forward(model, inputs)``; default ``model(inputs)``.

    Returns:
        ``{name: (N, D) tensor}`` in the model's dtype, detached.

    Raises:
        KeyError: If a name is not a module of ``model``.
    """
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise KeyError(f"no such module(s) in the model: {missing}")
    got: dict[str, list[Tensor]] = {name: [] for name in layers}

    def make_hook(name: str) -> Any:
        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, tuple):  # e.g. MultiheadAttention returns (output, weights)
                out = out[0]
            got[name].append(out.detach().reshape(out.shape[0], -1).clone())  # before in-place ops

        return hook

    handles = [modules[name].register_forward_hook(make_hook(name)) for name in layers]
    try:
        with measurement_mode(model), torch.no_grad():
            (forward or default_forward)(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(parts, dim=1) for name, parts in got.items() if parts}
