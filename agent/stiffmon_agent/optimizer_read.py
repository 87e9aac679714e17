"""What the agent reads from an optimizer once: its configuration, where its per-step columns
live, and the optimizer a framework or a wrapper holds.

* :func:`optimizer_config`: the ``hello``'s ``optimizer`` field, from the first param group;
* :func:`optimizer_columns`: per-step column names and values of every param group ``i``:
  ``lr/i``; ``momentum/i`` (SGD's momentum, or β1 of Adam-like ``betas``) and ``beta2/i``;
  ``nesterov/i`` (1.0 when set); ``weight_decay/i`` when the group has one (0 included, so a
  schedule that raises it later is seen from its first step). The values are read as they are
  (numbers or tensors); the publisher thread converts them. A schedule-free optimizer
  (:func:`schedule_free_warmup`) in its built-in warm-up steps with lr·(k+1)/warmup_steps, not
  the group's lr: its ``lr/i`` is that value.
* :func:`framework_inner` / :func:`wrapped_optimizer`: the torch optimizer inside accelerate's
  prepared one, and the one a SAM- or Lookahead-style wrapper steps.
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


Place = tuple[str, dict[str, Any], str, int]
"""A column: its name, the param group, the key, and the index in the key's value (-1: none;
:data:`WARMED`: the group's lr as a schedule-free warm-up scales it)."""

WARMED = -2
"""The index of a schedule-free group's ``lr`` place: read through :func:`warmed_lr`."""


def schedule_free_warmup(g: dict[str, Any]) -> bool:
    """Whether param group ``g`` is a schedule-free optimizer's with a built-in warm-up
    (``schedulefree``'s SGD/AdamW/RAdam ``ScheduleFree``: keys ``train_mode``, ``k`` (steps
    taken) and ``warmup_steps`` > 0)."""
    return "train_mode" in g and "k" in g and bool(g.get("warmup_steps"))


def warmed_lr(g: dict[str, Any]) -> Any:
    """The learning rate the next step of a schedule-free group uses: its step k (0-based)
    takes η = lr·min(1, (k+1)/warmup_steps) (``schedulefree`` writes it to ``scheduled_lr``
    only inside ``step()``, after a step pre-hook has read the group)."""
    k, w = int(g["k"]), int(g["warmup_steps"])
    return g["lr"] * ((k + 1) / w) if k < w else g["lr"]


def column_places(optimizer: torch.optim.Optimizer | None) -> list[Place]:
    """Where each column of :func:`optimizer_columns` lives (names follow the module docstring)."""
    places: list[Place] = []
    for i, g in enumerate(optimizer.param_groups if optimizer is not None else ()):
        places.append((f"lr/{i}", g, "lr", WARMED if schedule_free_warmup(g) else -1))
        if "momentum" in g:
            places.append((f"momentum/{i}", g, "momentum", -1))
            if g.get("nesterov"):
                places.append((f"nesterov/{i}", g, "nesterov", -1))
        elif "betas" in g:
            places += [(f"momentum/{i}", g, "betas", 0), (f"beta2/{i}", g, "betas", 1)]
        if "weight_decay" in g:
            places.append((f"weight_decay/{i}", g, "weight_decay", -1))
    return places


def read_places(places: list[Place]) -> list[Any]:
    """The current values at ``places`` (raises if a key has gone)."""
    return [g[k] if i == -1 else warmed_lr(g) if i == WARMED else g[k][i] for _, g, k, i in places]


def optimizer_columns(optimizer: torch.optim.Optimizer | None) -> tuple[list[str], list[Any]]:
    """Column names and values of the param groups' lr, momentum / betas and weight decay."""
    places = column_places(optimizer)
    return [name for name, *_ in places], read_places(places)


def default_run_name(cfg: dict[str, Any]) -> str:
    """A run's name when none is given, from its :func:`optimizer_config`:
    ``"<optimizer> lr=<lr>"`` (the first group's lr)."""
    return f"{cfg['type']} lr={cfg['lr']:g}" if "lr" in cfg else str(cfg["type"])


WRAPPED_NAMES = ("base_optimizer", "optimizer", "_optimizer")
"""Attributes under which optimizer wrappers keep the optimizer they wrap (SAM-style wrappers:
``base_optimizer``; Lookahead, Accelerate: ``optimizer``; Lightning: ``_optimizer``)."""


def framework_inner(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer``, else ``optimizer``.

    The prepared optimizer is a pass-through wrapper (the same param groups; its ``step()``
    steps the inner one on the steps that sync gradients, and its own step hooks never run):
    taken as it is, its type has no stability rule (threshold NaN), no λ1(P⁻¹H) for Adam, its
    backward passes are not counted, and the run is named ``"AcceleratedOptimizer lr=…"``.
    """
    if type(optimizer).__name__ == "AcceleratedOptimizer":
        inner = getattr(optimizer, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            return inner
    return optimizer


def wrapped_optimizer(optimizer: Any) -> Any:
    """The optimizer that ``optimizer`` wraps (one with a step pre-hook), or None: one of
    :data:`WRAPPED_NAMES`, else the first ``torch.optim.Optimizer`` among its attributes."""
    if optimizer is None:
        return None
    candidates: list[Any] = []
    for name in WRAPPED_NAMES:
        try:
            candidates.append(getattr(optimizer, name, None))
        except Exception:  # a property that raises: not this one
            continue
    attrs = getattr(optimizer, "__dict__", {})
    candidates += [v for v in attrs.values() if isinstance(v, torch.optim.Optimizer)]
    for inner in candidates:
        if (
            inner is not None
            and inner is not optimizer
            and callable(getattr(inner, "register_step_pre_hook", None))
            and hasattr(inner, "param_groups")
        ):
            return inner
    return None
