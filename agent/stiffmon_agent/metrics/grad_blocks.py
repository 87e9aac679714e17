r"""Per-example gradients grouped by layer: what a sharded Gram matrix is assembled from.

G = Σ_l G_l with G_l[i, j] = g_{i,l} · g_{j,l}, where g_{i,l} is example i's gradient restricted
to the trainable parameters of layer l. When the examples of a probe live in different processes
(:mod:`~stiffmon_agent.distributed`), a cross term G_l[i, j] needs what example j contributes
next to what example i does, so each process describes its examples' per-layer gradients in the
smaller of two forms (:class:`LayerGrads`), which are exchanged layer by layer:

* dense: D_l, the (n, P_l) matrix of per-example gradients, G_l[I, J] = D_l[I] D_l[J]ᵀ;
* ghost factors of a linear / conv weight (inputs a_i[t], output gradients b_i[t]),
  G[I, J] = Σ_{t,s} (a_i[t]·a_j[s]) (b_i[t]·b_j[s]) (:func:`ghost_cross`), chosen by the same
  cost model as the one-process Gram (:mod:`~stiffmon_agent.metrics.gram.plan`) at the global N,
  from shapes alone, so every process makes the same choice.

Layers with a hook rule (linear, conv, norms, attention) get them from one forward and backward
pass per chunk; embeddings and every other parameter get exact ``vmap(grad)`` gradients (else the
per-example loop). The same safety net as the Gram's checks diagonal and off-diagonal entries
against single-example backward passes and redoes everything exactly (dense) on a mismatch, with
a warning; on the same schedule as the one-process Gram
(:class:`~stiffmon_agent.metrics.gram.verify.SumCheckSchedule`: a model's first measurement,
every 10th, and every one once it has failed) it also checks the first chunk's Gram through
one weighted batch pass (:func:`~stiffmon_agent.metrics.gram.verify.
check_weighted_sum`: vᵀG v = ‖∇ Σ v_i L_i‖² for random signs v), which the entries miss where the
checked examples' rows happen to be right (a graph network's isolated nodes). Each rank checks
its own examples with no collective of its own (a rank whose check raises fails in
:func:`~stiffmon_agent.distributed.agree` like any other error, with nobody left waiting); the
count is advanced at every call, so ranks that make the same calls check at the same
measurements. Keys are those of :func:`~stiffmon_agent.metrics.gram.per_example_gram`'s
``layers``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from stiffmon_agent.metrics.gram import GramResult
from stiffmon_agent.metrics.gram.chunks import chunked_pass
from stiffmon_agent.metrics.gram.contract import (
    cat,
    ghost_cross,
    ghost_gram,
    materialise,
    rows_gram,
)
from stiffmon_agent.metrics.gram.coupling import coupled
from stiffmon_agent.metrics.gram.plan import Layer, ghost_cost, plan
from stiffmon_agent.metrics.gram.verify import (
    SumCheckSchedule,
    check_entries,
    check_weighted_sum,
    mismatch_note,
)
from stiffmon_agent.metrics.probe import (
    Batch,
    ForwardFn,
    LossFn,
    batch_size,
    default_forward,
    unreduced,
)
from stiffmon_agent.metrics.state import measurement_mode, trainable_parameters

__all__ = [
    "LayerGrads",
    "block_keys",
    "blocks_gram_result",
    "fell_back",
    "ghost_cross",
    "per_example_grad_blocks",
]


@dataclass
class LayerGrads:
    """Per-example gradients of one layer's parameters, for n examples.

    Attributes:
        dense: (n, P_dense) explicit per-example gradients (P_dense may be 0).
        factors: Ghost factors ``(a, b)`` of weights, a (n, g, T, d_in), b (n, g, T, d_out).
    """

    dense: Tensor
    factors: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    def shapes(self) -> list[tuple[int, ...]]:
        """Every tensor's shape without the example dimension (equal in every process)."""
        out = [tuple(self.dense.shape[1:])]
        for a, b in self.factors:
            out += [tuple(a.shape[1:]), tuple(b.shape[1:])]
        return out

    def tensors(self) -> list[Tensor]:
        return [self.dense, *(t for pair in self.factors for t in pair)]

    @staticmethod
    def from_tensors(ts: list[Tensor]) -> LayerGrads:
        return LayerGrads(ts[0], [(ts[i], ts[i + 1]) for i in range(1, len(ts), 2)])

    def take(self, index: Tensor) -> LayerGrads:
        """The gradients of examples ``index``."""
        return LayerGrads.from_tensors([t[index] for t in self.tensors()])

    def cross(self, other: LayerGrads) -> Tensor:
        """G_l[I, J] = g_{i,l} · g_{j,l} for i in these examples, j in ``other``'s."""
        out = self.dense @ other.dense.T
        for (a1, b1), (a2, b2) in zip(self.factors, other.factors, strict=True):
            out = out + ghost_cross(a1, b1, a2, b2)
        return out

    def gram(self) -> Tensor:
        """G_l[I, I] = ``self.cross(self)``, multiplying only the blocks on and above the
        diagonal of the dense part (:func:`~stiffmon_agent.metrics.gram.contract.rows_gram`):
        about half the multiply-adds of ``cross``, which a sharded Gram's diagonal blocks
        would otherwise spend."""
        n = self.dense.shape[0]
        out = rows_gram([self.dense]) if self.dense.shape[1] else self.dense.new_zeros(n, n)
        for a, b in self.factors:
            out = out + ghost_gram(a, b)
        return out


_sum_checks = SumCheckSchedule()  # the sharded blocks' (the one-process Gram keeps its own)
_FALLBACK = "Using the exact per-example path."


def fell_back(notes: tuple[str, ...]) -> bool:
    """Whether ``notes`` (from :func:`per_example_grad_blocks`) say a check failed and the blocks
    were redone exactly: what the ranks of a sharded Gram must agree on."""
    return any(note.endswith(_FALLBACK) for note in notes)


def _hookable(model: nn.Module) -> dict[str, Layer]:
    # embeddings' dense per-example gradients come from vmap (their hook form is sparse), except
    # a tied one's, summed densely with the other uses of its weight (those it leaves out tie
    # nothing: plan's ties stay complete)
    return {k: v for k, v in plan(model, "ghost").items() if v.tied or not _is_embedding(v.module)}


def _is_embedding(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Embedding | nn.EmbeddingBag)


def block_keys(model: nn.Module) -> dict[str, str]:
    """Parameter name → layer key: the name of the module owning the parameter (``"(root)"`` for
    the model's own parameters; ``out_proj`` apart from its ``MultiheadAttention``, as in
    :func:`~stiffmon_agent.metrics.gram.per_example_gram`). Static: the same in every process."""
    return {
        name: name.rsplit(".", 1)[0] if "." in name else "(root)"
        for name in trainable_parameters(model)
    }


def blocks_gram_result(blocks: dict[str, LayerGrads], notes: tuple[str, ...] = ()) -> GramResult:
    """A :class:`~stiffmon_agent.metrics.gram.GramResult` of the examples of ``blocks``."""
    layers = {k: d.gram() for k, d in blocks.items()}
    total = torch.stack(list(layers.values())).sum(0)
    return GramResult(total, layers, dict.fromkeys(layers, "materialise"), notes)


def per_example_grad_blocks(
    model: nn.Module,
    inputs: Batch,
    targets: Batch,
    loss_fn: LossFn,
    *,
    forward: ForwardFn | None = None,
    chunk_size: int | None = 128,
    verify: bool = True,
    n_global: int | None = None,
    exact: bool = False,
) -> tuple[dict[str, LayerGrads], tuple[str, ...]]:
    """Per-example gradients of the trainable parameters, one :class:`LayerGrads` per layer key.

    Args:
        model: The network (measured in eval mode; its state is restored).
        inputs: Examples along dim 0.
        targets: Targets, examples along dim 0.
        loss_fn: Loss module or per-example loss callable (see :mod:`.probe`).
        forward: ``forward(model, inputs)``; default ``model(inputs)``.
        chunk_size: Examples per forward/backward pass; None: all.
        verify: Check entries of the Gram against single-example backward passes; on a mismatch
            recompute every layer exactly and densely (warning). Where the exact
            (example-alone) paths were used, check that this process's per-example gradients
            add up to the gradient of its summed losses (:mod:`~stiffmon_agent.metrics.gram.
            coupling`: a note if not, an error if they all vanish).
        n_global: Examples of the whole (sharded) probe, for the choice of form (default: n).
        exact: Dense ``vmap(grad)`` (else loop) gradients for every parameter.

    Returns:
        The layers, keyed as :func:`block_keys` (every key present, in its order), and notes on
        what fell back.

    Raises:
        ValueError: If the model has no trainable parameter, or (with ``verify``) every
            example-alone gradient vanishes while the summed loss has one.
    """
    forward = forward or default_forward
    loss_fn = unreduced(loss_fn)
    n_total = batch_size(inputs)
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters")
    keys = block_keys(model)
    chunk = n_total if not chunk_size else max(1, min(chunk_size, n_total))
    n_choose = n_global or n_total
    with measurement_mode(model):
        args = (model, params, inputs, targets, forward, loss_fn, n_total, chunk, keys, n_choose)
        blocks, notes, alone = _blocks(*args, exact_only=exact)
        if verify and not exact and len(_hookable(model)):
            due = _sum_checks.due(model)  # counted at every call, whatever happens below
            g = _checked_entries(blocks, n_total)
            plist = list(params.values())
            bad = check_entries(model, plist, g, inputs, targets, forward, loss_fn)
            if bad is None and due:  # the entries miss errors confined to others (graph rows)
                first = _first_chunk_gram(blocks, chunk)
                bad = check_weighted_sum(
                    model, plist, first, inputs, targets, forward, loss_fn, chunk
                )
                if bad is not None:
                    _sum_checks.failed(model)
            if bad is not None:
                note = mismatch_note("the per-example gradient blocks", bad)
                warnings.warn(f"stiffmon: {note}", RuntimeWarning, stacklevel=2)
                blocks, more, alone = _blocks(*args, exact_only=True)
                notes = (*notes, *more, note)
        if verify and alone:
            total = torch.stack([g.gram() for g in blocks.values()]).sum(0)
            plist = list(params.values())
            said = coupled(model, plist, total, inputs, targets, forward, loss_fn, n_total, chunk)
            if said is not None:
                warnings.warn(f"stiffmon: {said}", RuntimeWarning, stacklevel=2)
                notes = (*notes, said)
    return blocks, notes


def _checked_entries(blocks: dict[str, LayerGrads], n: int) -> Tensor:
    """An (n, n) matrix holding the Gram entries :func:`check_entries` reads (the first, middle
    and last examples' products), zeros elsewhere: the whole local Gram is not needed."""
    idx = torch.tensor(sorted({0, n // 2, n - 1}))
    some = {k: g.take(idx) for k, g in blocks.items()}
    sub = torch.stack([g.gram() for g in some.values()]).sum(0)
    out = sub.new_zeros(n, n)
    out[idx[:, None], idx[None, :]] = sub
    return out


def _first_chunk_gram(blocks: dict[str, LayerGrads], chunk: int) -> Tensor:
    """G[:c, :c] of the first c = ``chunk`` examples, which :func:`check_weighted_sum` reads:
    c² entries, not the whole local Gram."""
    idx = torch.arange(chunk)
    return torch.stack([g.take(idx).gram() for g in blocks.values()]).sum(0)


def _blocks(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    inputs: Batch,
    targets: Batch,
    forward: ForwardFn,
    loss_fn: LossFn,
    n_total: int,
    chunk: int,
    keys: dict[str, str],
    n_choose: int,
    *,
    exact_only: bool,
) -> tuple[dict[str, LayerGrads], tuple[str, ...], bool]:
    """The blocks, notes, and whether any parameter's gradients came from the example-alone
    (vmap / loop) paths, which :func:`~stiffmon_agent.metrics.gram.coupling.coupled` checks."""
    layers = {} if exact_only else _hookable(model)
    done = chunked_pass(
        model, params, inputs, targets, forward, loss_fn, n_total, chunk, layers, "ghost"
    )
    layers, parts, notes = done.layers, done.parts, done.notes
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    for mname, layer in layers.items():
        for pname, block in layer.blocks.items():
            full = f"{mname}.{pname}" if mname else pname
            if block.grads:
                parts[full] = list(block.grads)
            elif block.kind == "linear":
                a0, b0 = block.a[0], block.b[0]  # every chunk's factors have these shapes
                ghost, mat = ghost_cost(n_choose, a0.shape[2], a0.shape[3], b0.shape[3])
                if ghost <= mat:
                    factors[full] = (cat(block.a), cat(block.b))
                else:  # chunk by chunk: the factors (often the bigger) are never joined
                    parts[full] = [materialise(a, b) for a, b in zip(block.a, block.b, strict=True)]
            else:
                raise ValueError(f"no per-example gradients for a {block.kind!r} block of {mname}")
    out: dict[str, LayerGrads] = {}
    like = next(iter(params.values()))
    for key in dict.fromkeys(keys.values()):
        names = [k for k in params if keys[k] == key]
        dense = [parts[k] for k in names if k not in factors]
        out[key] = LayerGrads(
            _joined(dense, n_total) if dense else like.new_zeros(n_total, 0),
            [factors[k] for k in names if k in factors],
        )
    return out, tuple(notes), bool(done.fallback)


def _joined(params: list[list[Tensor]], n: int) -> Tensor:
    """(n, Σ sizes): each parameter's per-example gradients (chunks of rows, (c, *shape))
    side by side, copied once into place (a single chunk of a single parameter: not at all)."""
    if len(params) == 1 and len(params[0]) == 1:
        return params[0][0].reshape(n, -1)
    widths = [math.prod(chunks[0].shape[1:]) for chunks in params]
    dtype = params[0][0].dtype
    for chunks in params:
        dtype = torch.promote_types(dtype, chunks[0].dtype)  # as torch.cat would
    out = params[0][0].new_empty((n, sum(widths)), dtype=dtype)
    col = 0
    for chunks, width in zip(params, widths, strict=True):
        row = 0
        for c in chunks:
            out[row : row + c.shape[0], col : col + width] = c.reshape(c.shape[0], -1)
            row += c.shape[0]
        col += width
    return out
