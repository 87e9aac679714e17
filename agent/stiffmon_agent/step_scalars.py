"""What the agent reads from the optimizer: its configuration and the per-step columns.

* :func:`optimizer_config`: the ``hello``'s ``optimizer`` field, from the first param group;
* :func:`optimizer_columns`: per-step column names and values of every param group ``i``:
  ``lr/i``; ``momentum/i`` (SGD's momentum, or β1 of Adam-like ``betas``) and ``beta2/i``;
  ``nesterov/i`` (1.0 when set); ``weight_decay/i`` when the group has one (0 included, so a
  schedule that raises it later is seen from its first step). The values are read as they are
  (numbers or tensors); the publisher thread converts them.
* :class:`OptimizerColumns`: the same at every step for a few µs: the names and where each value
  lives are worked out once and again whenever the param groups change (or every
  :data:`RECHECK_STEPS` steps, for a group edited in place), then each step only reads the values.
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
        if "weight_decay" in g:
            names.append(f"weight_decay/{i}")
            values.append(g["weight_decay"])
    return names, values


RECHECK_STEPS = 256


class OptimizerColumns:
    """:func:`optimizer_columns` at every step, without working the names out again.

    In a real training loop every Python operation costs several times its tight-loop time (the
    caches are cold after the step): building the names anew took ~5 µs a step, reading the values
    where they are known to be takes ~2.

    Args:
        optimizer: The optimizer (None: no columns).
    """

    def __init__(self, optimizer: torch.optim.Optimizer | None) -> None:
        self.optimizer = optimizer
        self.names: tuple[str, ...] = ()
        self._groups: list[dict[str, Any]] | None = None
        self._count = -1
        self._where: list[tuple[dict[str, Any], str, int]] = []  # group, key, index or -1
        self._age = 0

    def values(self) -> list[Any]:
        """The current values, in the order of :attr:`names` (which may change at this call)."""
        opt = self.optimizer
        if opt is None:
            return []
        groups = opt.param_groups
        self._age += 1
        if groups is not self._groups or len(groups) != self._count or self._age >= RECHECK_STEPS:
            self._rebuild(groups)
        try:
            return [g[k] if i < 0 else g[k][i] for g, k, i in self._where]
        except Exception:  # a key removed, a group replaced: work it out again
            self._rebuild(groups)
            try:
                return [g[k] if i < 0 else g[k][i] for g, k, i in self._where]
            except Exception:  # not an optimizer we can read: no columns rather than a crash
                self.names, self._where = (), []
                return []

    def _rebuild(self, groups: list[dict[str, Any]]) -> None:
        try:
            names, _ = optimizer_columns(self.optimizer)
        except Exception:
            names = []
            groups = []
        where: list[tuple[dict[str, Any], str, int]] = []
        for g in groups:
            where.append((g, "lr", -1))
            if "momentum" in g:
                where.append((g, "momentum", -1))
                if g.get("nesterov"):
                    where.append((g, "nesterov", -1))
            elif "betas" in g:
                where += [(g, "betas", 0), (g, "betas", 1)]
            if "weight_decay" in g:
                where.append((g, "weight_decay", -1))
        self.names, self._where = tuple(names), where
        self._groups, self._count, self._age = groups, len(groups), 0
