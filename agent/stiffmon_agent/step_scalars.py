"""What the agent reads from the optimizer: its configuration and the per-step columns.

* :func:`optimizer_config`: the ``hello``'s ``optimizer`` field, from the first param group;
* :func:`optimizer_columns`: per-step column names and values of every param group ``i``:
  ``lr/i``; ``momentum/i`` (SGD's momentum, or β1 of Adam-like ``betas``) and ``beta2/i``;
  ``nesterov/i`` (1.0 when set); ``weight_decay/i`` when non-zero. The values are read as they
  are (numbers or tensors); the publisher thread converts them.
"""

from __future__ import annotations

from typing import Any

import torch


def optimizer_config(optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Type, group count and the numeric hyper-parameters of the first param group."""
    if optimizer is None:
        return {"type": "none"}
    g = optimizer.param_groups[0]
    cfg: dict[str, Any] = {"type": type(optimizer).__name__, "groups": len(optimizer.param_groups)}
    for key in ("lr", "momentum", "dampening", "weight_decay", "eps"):
        if isinstance(g.get(key), int | float) and not isinstance(g.get(key), bool):
            cfg[key] = float(g[key])
    if "nesterov" in g:
        cfg["nesterov"] = bool(g["nesterov"])
    if isinstance(g.get("betas"), tuple | list) and len(g["betas"]) == 2:
        cfg["beta1"], cfg["beta2"] = float(g["betas"][0]), float(g["betas"][1])
    return cfg


def optimizer_columns(optimizer: torch.optim.Optimizer | None) -> tuple[list[str], list[Any]]:
    """Column names and values of the param groups' lr, momentum / betas and weight decay."""
    names: list[str] = []
    values: list[Any] = []
    if optimizer is None:
        return names, values
    for i, g in enumerate(optimizer.param_groups):
        names.append(f"lr/{i}")
        values.append(g["lr"])
        if "momentum" in g:
            names.append(f"momentum/{i}")
            values.append(g["momentum"])
            if g.get("nesterov"):
                names.append(f"nesterov/{i}")
                values.append(1.0)
        elif "betas" in g:
            names += [f"momentum/{i}", f"beta2/{i}"]
            values += [g["betas"][0], g["betas"][1]]
        if g.get("weight_decay"):
            names.append(f"weight_decay/{i}")
            values.append(g["weight_decay"])
    return names, values
