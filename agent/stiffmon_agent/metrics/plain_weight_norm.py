r"""Weight normalisation in plain ops for the duration of a measurement.

``torch.nn.utils.parametrizations.weight_norm`` and the older ``torch.nn.utils.weight_norm``
compute w = g · v / ‖v‖ (the norm over every dimension but ``dim``; over the whole tensor for
``dim=None``, stored as −1) with the fused ``torch._weight_norm``, whose first derivative is
right but whose double backward is not: Hessian-vector products through it are not even
symmetric, and λ1_H came out 4–8 % low on a weight-normed MLP. Inside :func:`plain_weight_norm`
both compute the same w with ``v * (g / v.norm(...))``, whose first and second derivatives
are torch's ordinary ones; the forward values agree to rounding.

:func:`plain_weight_norm` is the measurement's context for weights computed from parameters:
it also turns ``parametrize.cached()`` off and keeps the tensors that forward pre-hooks set on
modules (:mod:`.parametrized`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from stiffmon_agent.metrics.parametrized import kept_module_tensors, uncached_parametrizations


def weight_norm_plain(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    """g · v / ‖v‖, the norm over every dimension of v but ``dim`` (all of them for −1), as
    ``torch._weight_norm(v, g, dim)`` computes it, in differentiable-twice ops."""
    if dim == -1:
        w: Tensor = v * (g / v.norm())
        return w
    d = dim % v.dim()
    others = [k for k in range(v.dim()) if k != d]
    w = v * (g / v.norm(2, dim=others, keepdim=True))
    return w


def _old_style(model: nn.Module) -> bool:
    """Whether a module of ``model`` has the old ``torch.nn.utils.weight_norm`` hook."""
    from torch.nn.utils.weight_norm import WeightNorm

    return any(
        isinstance(hook, WeightNorm)
        for m in model.modules()
        for hook in m._forward_pre_hooks.values()
    )


@contextmanager
def plain_weight_norm(model: nn.Module) -> Iterator[None]:
    """Inside: every weight norm of ``model`` computed by :func:`weight_norm_plain`.

    The parametrization's ``_WeightNorm`` modules get an instance ``forward``; the old hook's
    module-level ``_weight_norm`` is swapped while the block runs (only where ``model`` has
    one). Also inside: ``parametrize.cached()`` off and the modules' tensor attributes kept
    (:func:`.uncached_parametrizations`, :func:`.kept_module_tensors`). Everything is put back
    afterwards, also when the block raised.
    """
    from torch.nn.utils.parametrizations import _WeightNorm

    patched: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, _WeightNorm) and "forward" not in m.__dict__:
            m.forward = lambda g, v, _d=m.dim: weight_norm_plain(v, g, _d)  # type: ignore[method-assign, misc]
            patched.append(m)
    old = sys.modules.get("torch.nn.utils.weight_norm")
    swap = old is not None and _old_style(model) and hasattr(old, "_weight_norm")
    saved = getattr(old, "_weight_norm", None)
    if swap:
        old._weight_norm = weight_norm_plain  # type: ignore[union-attr]
    try:
        with uncached_parametrizations(), kept_module_tensors(model):
            yield
    finally:
        for m in patched:
            del m.forward
        if swap:
            old._weight_norm = saved  # type: ignore[union-attr]


__all__ = ["plain_weight_norm", "weight_norm_plain"]
