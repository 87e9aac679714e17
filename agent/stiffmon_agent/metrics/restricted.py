r"""Sharpness on the embedding rows the probe touches: H = H_TT ⊕ 0, exactly.

A row r of an ``nn.Embedding`` weight W that no probe index selects never enters the probe's
loss, so the loss Hessian's rows and columns of its coordinates are zero: with T the touched
coordinates (every other parameter, and the touched rows of each table) and U the untouched
ones, H = H_TT ⊕ 0_UU. Under a diagonal preconditioner P (D = P^{-1/2}) and a coupled-L2 shift
S (an adaptive optimizer's ``weight_decay``) the solved operator D (H + S) D is block diagonal
too: D_T (H_TT + S_T) D_T ⊕ diag(S_U / P_U), whose untouched block is a diagonal known
exactly. So λ_i of the whole operator are the top eigenvalues of the union of the touched
block's (Lanczos on P' = |T| coordinates) and the untouched diagonal's values (0 for the raw
Hessian, S_u / P_u under a preconditioner, 0 where P_u = ∞).

The touched block is measured on a compact table: for each restrictable table the weight is
frozen for the measurement and a parameter ``stiffmon_rows`` = W[T_rows] (rows sorted) takes
its place, the module's forward looking up ``searchsorted(T_rows, idx)`` in it; the Hessian of
the loss over (the other parameters, the compact tables) is H_TT. Its vectors hold P' numbers,
never P: on a 2,000,000 × 16 table a product costs a few |T_rows| × 16 vectors, not 32M ones.

A table is restricted only where that is exact, found by running the probe's forwards and
losses once (per chunk, with the random state each product uses) under a
``TorchFunctionMode`` that sees every torch call given the weight: each must be the
``F.embedding`` of the module's own forward, without ``padding_idx``, ``max_norm`` or
``scale_grad_by_freq`` (``sparse=`` is fine: the compact table is dense). Anything else (the
table tied to an output layer, used by another path or by the loss, an ``EmbeddingBag``, a
subclass with its own forward, a parametrized weight) leaves that table in the full
measurement (:attr:`Restriction.kept` says why); the other tables are still restricted.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from stiffmon_agent.metrics.eigen import EigenResult
from stiffmon_agent.metrics.pinned_rng import pinned

__all__ = [
    "RESTRICT_MIN",
    "ROWS",
    "Restriction",
    "Table",
    "find_restriction",
    "restriction_for",
    "shift_diagonal",
    "untouched_top",
    "with_untouched",
]

ROWS = "stiffmon_rows"
"""Name of the compact table parameter registered on a restricted module for a measurement."""

_EMBEDDING = inspect.signature(F.embedding)
# Tensor metadata reads that do not use the values (allowed on a restricted weight).
_METADATA = [
    torch.Tensor.size,
    torch.Tensor.dim,
    torch.Tensor.numel,
    torch.Tensor.shape.__get__,  # type: ignore[attr-defined]
    torch.Tensor.ndim.__get__,  # type: ignore[attr-defined]
    torch.Tensor.dtype.__get__,  # type: ignore[attr-defined]
    torch.Tensor.device.__get__,  # type: ignore[attr-defined]
    torch.Tensor.layout.__get__,  # type: ignore[attr-defined]
    torch.Tensor.is_sparse.__get__,  # type: ignore[attr-defined]
    torch.Tensor.requires_grad.__get__,  # type: ignore[attr-defined]
]


@dataclass
class Table:
    """One restrictable embedding table.

    Attributes:
        name: The weight's name among the trainable parameters (``emb.weight``).
        module: Its ``nn.Embedding``.
        rows: Sorted distinct row indices the probe touches (int64, on the weight's device).
    """

    name: str
    module: nn.Embedding
    rows: Tensor

    @property
    def untouched(self) -> int:
        """Coordinates of the rows the probe never touches."""
        return (self.module.num_embeddings - self.rows.numel()) * self.module.embedding_dim


@dataclass
class Restriction:
    """What a measurement restricts: :attr:`tables`, and the tables :attr:`kept` whole (why)."""

    tables: list[Table] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)

    @property
    def untouched(self) -> int:
        """Coordinates dropped from the Lanczos vectors (the untouched block's size)."""
        return sum(t.untouched for t in self.tables)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Each table's weight frozen and replaced by its compact ``stiffmon_rows`` parameter
        (the trainable parameters keep their order: it is the module's only one); restored on
        exit, also on an exception."""
        done: list[Table] = []
        try:
            for t in self.tables:
                m, w = t.module, t.module.weight
                m.register_parameter(ROWS, nn.Parameter(w.detach()[t.rows].clone()))
                m._stiffmon_row_index = t.rows  # type: ignore[assignment]
                m.forward = MethodType(_rows_forward, m)  # type: ignore[method-assign]
                w.requires_grad_(False)
                done.append(t)
            yield
        finally:
            for t in done:
                m = t.module
                m.weight.requires_grad_(True)
                del m._parameters[ROWS]
                del m.forward
                del m._stiffmon_row_index

    def gather(self, full: Tensor, names: list[str], sizes: list[int]) -> Tensor:
        """A flat vector over all trainable parameters (``names``/``sizes``, in order) reduced
        to the restricted coordinates, in the restricted operator's order."""
        by_name = {t.name: t for t in self.tables}
        parts = []
        for name, piece in zip(names, full.split(sizes), strict=True):
            t = by_name.get(name)
            parts.append(piece if t is None else piece.view(-1, t.module.embedding_dim)[t.rows])
        return torch.cat([q.reshape(-1) for q in parts])


def _rows_forward(self: nn.Embedding, input: Tensor) -> Tensor:
    """The forward of a restricted table: the compact table's row of each index."""
    index: Tensor = self._stiffmon_row_index  # type: ignore[assignment]
    pos = torch.searchsorted(index, input.contiguous()).clamp_(max=index.numel() - 1)
    if not torch.equal(index[pos], input):
        raise RuntimeError(
            "row-restricted sharpness: the probe's indices differ from those found before the "
            "measurement (a forward whose indices change between passes)"
        )
    return F.embedding(pos, getattr(self, ROWS))


class _WeightUses(TorchFunctionMode):
    """Records the indices of every ``F.embedding`` on the watched weights and why a weight
    cannot be restricted (any other use of it)."""

    def __init__(self, weights: dict[str, Tensor]) -> None:
        super().__init__()
        self.weights = weights
        self.indices: dict[str, list[Tensor]] = {n: [] for n in weights}
        self.calls: dict[str, int] = dict.fromkeys(weights, 0)
        self.bad: dict[str, str] = {}

    def _which(self, args: Any, kwargs: dict[str, Any]) -> list[str]:
        leaves = [a for a in tree_leaves((args, kwargs)) if isinstance(a, Tensor)]
        return [n for n, w in self.weights.items() if any(a is w for a in leaves)]

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        for name in self._which(args, kwargs):
            if func is F.embedding:
                b = _EMBEDDING.bind(*args, **kwargs).arguments
                if b["weight"] is not self.weights[name] or b["input"] is self.weights[name]:
                    self.bad.setdefault(name, "the weight is an index of F.embedding")
                elif b.get("padding_idx") is not None:
                    self.bad.setdefault(name, "padding_idx")
                elif b.get("max_norm") is not None:
                    self.bad.setdefault(name, "max_norm")
                elif b.get("scale_grad_by_freq"):
                    self.bad.setdefault(name, "scale_grad_by_freq")
                else:
                    self.calls[name] += 1
                    self.indices[name].append(b["input"].detach().reshape(-1))
            elif not any(func == f for f in _METADATA):
                what = getattr(func, "__qualname__", None) or getattr(func, "__name__", str(func))
                self.bad.setdefault(name, f"also used by {what}")
        return func(*args, **kwargs)


def find_restriction(
    model: nn.Module, passes: list[Callable[[], Any]], names: list[str]
) -> Restriction:
    """The embedding tables whose untouched rows can be dropped exactly.

    Args:
        model: The network (in measurement mode).
        passes: Callables each running one probe chunk's forward and loss as a product does
            (same random state); run once here without gradients.
        names: The trainable parameters' names (a table is a candidate only if its weight is
            one of them).

    Returns:
        The restriction (empty if no table qualifies or none has an untouched row).
    """
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    params = dict(model.named_parameters())
    out = Restriction()
    candidates: dict[str, nn.Embedding] = {}
    for mname, m in model.named_modules():
        if not isinstance(m, nn.Embedding):
            continue
        name = f"{mname}.weight" if mname else "weight"
        if name not in names or params.get(name) is not m.weight:
            continue
        if type(m).forward is not nn.Embedding.forward:
            out.kept[name] = f"{type(m).__name__} has its own forward"
        elif counts.get(id(m.weight), 0) != 1:
            out.kept[name] = "the weight is shared with another module"
        elif not isinstance(m.weight, nn.Parameter) or m.weight.is_sparse:
            out.kept[name] = "the weight is not a plain dense parameter"
        else:
            candidates[name] = m
    if not candidates:
        return out
    uses = _WeightUses({n: m.weight for n, m in candidates.items()})
    module_calls = dict.fromkeys(candidates, 0)

    def counter(name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            module_calls[name] += 1

        return hook

    handles = [m.register_forward_pre_hook(counter(n)) for n, m in candidates.items()]
    try:
        with torch.no_grad(), uses:
            for run in passes:
                run()
    finally:
        for h in handles:
            h.remove()
    for name, m in candidates.items():
        if name in uses.bad:
            out.kept[name] = uses.bad[name]
        elif uses.calls[name] != module_calls[name]:
            out.kept[name] = "F.embedding on the weight outside the module's forward"
        elif not uses.calls[name]:
            continue  # not used at all: all its rows untouched (its block is zero)
        else:
            rows = torch.unique(torch.cat(uses.indices[name]).to(m.weight.device))
            if rows.numel() < m.num_embeddings:
                out.tables.append(Table(name, m, rows))
    return out


def untouched_top(
    restriction: Restriction,
    names: list[str],
    sizes: list[int],
    preconditioner: Tensor | None,
    shift: Tensor | None,
    k: int,
    block: int = 1 << 16,
) -> Tensor:
    """The top ≤ k values of the untouched block's diagonal (float64): zeros without a
    preconditioner or a shift, else S_u / P_u (0 where P_u is 0 or ∞) over the untouched
    coordinates, computed ``block`` rows at a time (no table-sized temporaries)."""
    count = restriction.untouched
    if preconditioner is None or shift is None:
        return torch.zeros(min(k, count), dtype=torch.float64)
    by_name = {t.name: t for t in restriction.tables}
    pieces = zip(names, preconditioner.split(sizes), shift.split(sizes), strict=True)
    tops = [torch.zeros(0, dtype=torch.float64)]
    for name, p_all, s_all in pieces:
        if (t := by_name.get(name)) is None:
            continue
        dim, rows = t.module.embedding_dim, t.module.num_embeddings
        for start in range(0, rows, block):
            stop = min(start + block, rows)
            p = p_all[start * dim : stop * dim].view(-1, dim)
            vals = shift_diagonal(p, s_all[start * dim : stop * dim].view(-1, dim), p)
            assert vals is not None
            inside = t.rows[(t.rows >= start) & (t.rows < stop)] - start
            keep = torch.ones(stop - start, dtype=torch.bool, device=p.device)
            keep[inside] = False
            vals = vals[keep].reshape(-1)
            tops.append(vals.topk(min(k, vals.numel())).values.double().cpu())
            tops = [torch.cat(tops).sort(descending=True).values[:k]]
    return tops[0]


def shift_diagonal(preconditioner: Tensor, shift: Tensor | None, like: Tensor) -> Tensor | None:
    """S/P elementwise (the diagonal D S D added to D H D), 0 where P is 0 or ∞; None without S."""
    if shift is None:
        return None
    d = preconditioner.detach().to(like).rsqrt()
    s2 = shift.detach().to(like) * d * d
    return torch.where(torch.isfinite(d), s2, 0.0)


def with_untouched(res: EigenResult, top: Tensor, k: int) -> EigenResult:
    """The touched block's result with the untouched diagonal's top values merged in: the top k
    of both (an untouched value is an exact eigenvalue: residual 0). Eigenvectors and the warm
    start stay the touched block's (restricted coordinates)."""
    if not top.numel() or res.nonfinite or not res.eigenvalues.numel():
        return res
    vals = torch.cat([res.eigenvalues.double().cpu(), top.double()])
    resid = torch.cat([res.residuals.double().cpu(), torch.zeros_like(top, dtype=torch.float64)])
    order = vals.argsort(descending=True, stable=True)[:k]
    return replace(
        res,
        eigenvalues=vals[order].to(res.eigenvalues),
        residuals=resid[order].to(res.residuals),
    )


RESTRICT_MIN = 1 << 20
"""Untouched embedding parameters from which a measurement is restricted by default (each
Lanczos vector then saves at least 4 MiB in float32)."""


def restriction_for(
    model: nn.Module, op: Any, restrict: bool | None, sharded: bool = False
) -> Restriction | None:
    """The restriction a measurement of ``op`` (a
    :class:`~stiffmon_agent.metrics.HessianOperator` of ``model``) uses, or None to solve the
    whole H.

    Args:
        model: The network (in measurement mode).
        op: Its Hessian operator over all trainable parameters.
        restrict: None: where the untouched rows hold at least :data:`RESTRICT_MIN` parameters
            (a smaller model is solved whole, as a sharded measurement solves it); True:
            wherever exact; False: never.
        sharded: The products are summed over processes: never (each touches its own rows).
    """
    if restrict is False or sharded:
        return None
    if not restrict and table_parameters(model) < RESTRICT_MIN:
        return None  # the probe forward that finds the rows is not worth it
    found = find_restriction(model, probe_passes(op), op.names)
    if not found.tables or (restrict is None and found.untouched < RESTRICT_MIN):
        return None
    return found


def table_parameters(model: nn.Module) -> int:
    """Parameters in the model's ``nn.Embedding`` tables."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))


def probe_passes(op: Any) -> list[Callable[[], Any]]:
    """One callable per probe chunk of ``op`` running its forward and loss as a product does
    (with the chunk's pinned random state)."""

    def run(c: int, x: Any, y: Any, n: int) -> Any:
        with pinned(c, op._devices):
            return op._mean_loss(x, y, n, op.forward(op.model, x))

    return [functools.partial(run, c, x, y, n) for c, (x, y, n) in enumerate(op.chunks)]
