r"""Weights computed from the optimizer's parameters, as a measurement must see and leave them.

A measurement differentiates with respect to the parameters the optimizer holds; a weight
computed from them (``torch.nn.utils.parametrize``, a forward pre-hook: the old
``spectral_norm`` / ``weight_norm``, ``torch.nn.utils.prune``, a LoRA-style W₀ + A B) must be
recomputed from them at every forward of the measurement, and the model left as it was.

* ``parametrize.cached()``: a loop calling ``agent.step()`` inside the block has the weights
  W = f(θ) of its own forward cached, from θ before ``optimizer.step()`` and with their graph
  freed by ``backward()``. A measurement reading them differentiated a stale constant: λ1_H
  came out 10–18 % low and λ1(P⁻¹H) up to 70 % low with nothing said, and the Gram failed
  ("backward through the graph a second time"). :func:`uncached_parametrizations` turns the
  cache off for the measurement (every access computes f(θ) anew) and gives the loop its
  cache back afterwards, the same dict with the same tensors.
* A forward pre-hook that sets a module attribute (``module.weight = weight_orig * mask``)
  leaves the measurement's last W there; the loop's last forward left its own.
  :func:`kept_module_tensors` puts back every such tensor attribute (not a parameter or a
  buffer, which :func:`~stiffmon_agent.metrics.state.measurement_mode` restores), the same
  object, and removes those the measurement added, so that ``module.weight`` read between steps
  is what it would have been without the agent.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn
from torch.nn.utils import parametrize


@contextmanager
def uncached_parametrizations() -> Iterator[None]:
    """Inside: ``parametrize.cached()`` off (also inside a forward that enters it itself, which
    then caches in a dict of its own); afterwards its counter and cache dict as they were."""
    enabled, cache = parametrize._cache_enabled, parametrize._cache
    parametrize._cache_enabled = 0
    parametrize._cache = {}
    try:
        yield
    finally:
        parametrize._cache_enabled = enabled
        parametrize._cache = cache


def _tensor_attrs(model: nn.Module) -> dict[tuple[nn.Module, str], Tensor]:
    """Every tensor held as a plain attribute of a module of ``model`` (in its ``__dict__``,
    so neither a parameter nor a buffer)."""
    return {(m, k): v for m in model.modules() for k, v in vars(m).items() if isinstance(v, Tensor)}


@contextmanager
def kept_module_tensors(model: nn.Module) -> Iterator[None]:
    """Afterwards, also when the block raised: each module's tensor attributes the same objects
    as before (a pre-hook's ``weight``), and none the block added."""
    before = _tensor_attrs(model)
    try:
        yield
    finally:
        for (m, k), v in _tensor_attrs(model).items():
            if (m, k) not in before and vars(m).get(k) is v:
                del m.__dict__[k]
        for (m, k), v in before.items():
            if m.__dict__.get(k) is not v:
                m.__dict__[k] = v


__all__ = ["kept_module_tensors", "uncached_parametrizations"]
