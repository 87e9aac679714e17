"""A class-index loss that leaves out targets the agent does not know it leaves out.

The agent takes a plain callable's ignore index to be the one it declares (``ignore_index``,
a ``functools.partial`` keyword) or −100. A callable that ignores another one inside
(``F.cross_entropy(..., ignore_index=255)`` or a padding id 0 in a lambda) gives those positions
a loss of exactly 0, and they would count in each example's mean: every loss and gradient scaled
down, silently. :func:`refuse_hidden_ignore` tells such a callable from the losses it returned.
"""

from __future__ import annotations

import torch

__all__ = ["refuse_hidden_ignore"]


def refuse_hidden_ignore(
    outputs: torch.Tensor,
    targets: torch.Tensor,
    losses: torch.Tensor,
    dim: int,
    classes: int,
    ignore: int,
) -> None:
    """Refuse per-element ``losses`` of class-index ``targets`` (the classes along ``dim`` of
    ``outputs``, C = ``classes`` ≥ 2) that leave out a target other than ``ignore``: one outside
    the classes whose loss is exactly 0 wherever it occurs, or a class whose every position has
    a loss of exactly 0 (:func:`_ignored_class`).

    Raises:
        ValueError: If so, with the ways to declare the index.
    """
    outside = ((targets < 0) | (targets >= classes)) & (targets != ignore)
    if bool(outside.any()) and not bool((losses.detach()[outside] != 0).any()):
        value = int(targets[outside][0])
        why = (
            f"the probe's targets hold {value}, not one of the outputs' {classes} classes, and "
            "loss_fn's losses there are 0"
        )
    else:
        found = _ignored_class(outputs, targets, losses, dim, classes, ignore)
        if found is None:
            return
        value = found
        why = (
            f"loss_fn's losses are exactly 0 at every position whose target is class {value} "
            "and nowhere else, where the outputs do not predict it with certainty (a padding "
            "id ignored inside the callable?)"
        )
    raise ValueError(
        f"{why}: it ignores {value}, but the agent takes "
        f"{ignore} for a plain callable's ignore index and would count those positions in "
        f"each example's mean. Tell it: set loss_fn.ignore_index = {value}, pass functools.partial("
        f'F.cross_entropy, ignore_index={value}, reduction="none") or '
        f"nn.CrossEntropyLoss(ignore_index={value})"
    )


def _ignored_class(
    outputs: torch.Tensor,
    targets: torch.Tensor,
    losses: torch.Tensor,
    dim: int,
    classes: int,
    ignore: int,
) -> int | None:
    """The class k a per-element cross-entropy leaves out, or None: its losses are exactly 0
    at every one (two or more) of the positions whose target is k and at no other counted
    position, where they are −log p of the target, while the outputs' log-softmax gives k at
    most probability e^-0.001 at one of them (a real loss of 0 needs p_k = 1 to rounding; with
    k = 0 as a padding id, what ``F.cross_entropy(..., ignore_index=0)`` in a lambda gives).
    Other losses (a margin loss's zeros are real; class weights, label smoothing) are not
    judged."""
    inside = (targets >= 0) & (targets < classes) & (targets != ignore)
    zero = (losses.detach() == 0) & inside
    if not bool(zero.any()):
        return None
    values = torch.unique(targets[zero])
    if values.numel() != 1:
        return None
    k = int(values[0])
    at_k = inside & (targets == k)
    if int(at_k.sum()) < 2 or not bool(zero[at_k].all()) or not bool((inside & ~at_k).any()):
        return None
    index = targets.clamp(0, classes - 1).unsqueeze(dim)
    logp = outputs.detach().log_softmax(dim).gather(dim, index).squeeze(dim).to(losses.dtype)
    other = inside & ~at_k
    # cross-entropy (−log p) at every other counted position: a margin loss's zeros are real
    if not torch.allclose(losses.detach()[other], -logp[other], rtol=1e-4, atol=1e-6):
        return None
    return k if bool((logp[at_k] < -1e-3).any()) else None
