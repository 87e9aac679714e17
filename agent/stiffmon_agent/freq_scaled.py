r"""Embeddings with ``scale_grad_by_freq=True``: a backward that is not a gradient.

``nn.Embedding(scale_grad_by_freq=True)`` (and ``nn.EmbeddingBag``) divides the gradient of each
weight row by the number of times its index occurs in the input of that forward call. The count
depends on the batch, so the result is not the derivative of any loss:

* per-example gradients: computed for one example alone (``vmap(grad)``, a loop) the count is
  that index's occurrences within the example: 1 for an example with a single index (one token
  per example), so its gradient is the true ∇L_i; with a repeated index (a sentence using a
  word twice) it is not (the Gram was 3 % off the true one for 5-token sequences over 6 ids).
  The Gram's batch checks (the weighted sum vᵀGv = ‖∇Σ v_i L_i‖², the coupling check) compare
  with a batch backward that divides by the counts over the whole batch, and fail even where
  every example's gradient is right;
* Hessian-vector products differentiate the rescaled backward: the operator is not symmetric
  (defect 0.2 in a test), and Lanczos gives λ1_H = 0.6088 against 0.6012.

:func:`unscaled` switches the option off for the time of a measurement (the flag is read at
every forward), so that the per-example gradients, the Gram's checks and the Hessian are those
of the loss itself; :func:`freq_scaling_note` says at construction what the measurements make
of the option.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["freq_scaled", "freq_scaling_note", "unscaled"]


def freq_scaled(model: nn.Module) -> dict[str, nn.Module]:
    """The embeddings of ``model`` with ``scale_grad_by_freq=True`` and a trainable weight, by
    module name (``"(root)"`` for the model itself)."""
    return {
        name or "(root)": m
        for name, m in model.named_modules()
        if isinstance(m, nn.Embedding | nn.EmbeddingBag)
        and m.scale_grad_by_freq
        and m.weight.requires_grad
    }


@contextmanager
def unscaled(model: nn.Module) -> Iterator[None]:
    """``scale_grad_by_freq`` off on every embedding of ``model`` inside, restored afterwards
    (also when the body raises): gradients and Hessian-vector products inside are derivatives
    of the loss, ∇L_i and ∇²L."""
    mods = list(freq_scaled(model).values())
    for m in mods:
        m.scale_grad_by_freq = False
    try:
        yield
    finally:
        for m in mods:
            m.scale_grad_by_freq = True


def freq_scaling_note(model: nn.Module) -> str | None:
    """What the measurements make of ``model``'s embeddings with ``scale_grad_by_freq=True``
    (None if it has none): the layers, the option, and that
    :func:`~stiffmon_agent.metrics.state.measurement_mode` switches it off (:func:`unscaled`)."""
    names = list(freq_scaled(model))
    if not names:
        return None
    which = ", ".join(names)
    head = (
        f"embedding {which} uses scale_grad_by_freq=True: its backward divides each index's "
        "gradient by the index's count in the batch, which is not the gradient of any loss "
        "(the training step follows that rescaled direction)"
    )
    return (
        f"{head}. The measurements switch the option off: the per-example gradients, the Gram "
        "(stiffness, gradient noise) and the Hessian (λ1_H, trace, density) are those of the "
        "loss itself."
    )
