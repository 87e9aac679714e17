r"""Fallback 1: exact per-example gradients of some parameters with ``torch.func.vmap(grad)``."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from stiffmon_agent.metrics.probe import Batch, ForwardFn, ForwardModule, LossFn, per_example_losses


@contextmanager
def dense_embeddings(model: nn.Module) -> Iterator[None]:
    """``Embedding`` / ``EmbeddingBag`` modules with ``sparse=True`` run with ``sparse=False``
    inside (restored afterwards): their gradient is the same, dense instead of sparse, and vmap
    cannot batch the sparse one (``aten::view`` on a sparse tensor)."""
    sparse = [
        m for m in model.modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.sparse
    ]
    for m in sparse:
        m.sparse = False
    try:
        yield
    finally:
        for m in sparse:
            m.sparse = True


def vmap_grads(
    model: nn.Module,
    names: list[str],
    chunk_inputs: Batch,
    chunk_targets: Batch,
    forward: ForwardFn,
    loss_fn: LossFn,
) -> dict[str, Tensor]:
    """Exact per-example gradients of the parameters ``names`` via ``vmap(grad)``.

    Tied parameters stay tied (``functional_call(tie_weights=True)``), so the gradient of a
    shared parameter sums all of its uses. Raises whatever vmap raises on modules it cannot
    batch (RNNs, in-place updates of parameters): the caller falls back to the loop.
    Sparse embeddings run dense (:func:`dense_embeddings`).
    """
    wrapper = ForwardModule(model, forward)
    params = dict(model.named_parameters())
    chosen = {f"model.{k}": params[k].detach() for k in names}

    def example_loss(p: dict[str, Tensor], x: Batch, y: Batch) -> Tensor:
        x1 = tree_map(lambda t: t.unsqueeze(0), x)
        y1 = tree_map(lambda t: t.unsqueeze(0), y)
        out = functional_call(wrapper, p, (x1,), strict=False, tie_weights=True)
        return per_example_losses(loss_fn, out, y1, 1)[0]

    with warnings.catch_warnings(), dense_embeddings(model):
        # torch warns that some ops have no batching rule yet: still exact
        warnings.filterwarnings("ignore", message="There is a performance drop")
        grads = vmap(grad(example_loss), in_dims=(None, 0, 0))(chosen, chunk_inputs, chunk_targets)
    return {k: grads[f"model.{k}"] for k in names}
