r"""Stiffness (Fort et al. 2019, arXiv:1901.09491) from a per-example gradient Gram matrix.

All functions take G[i, j] = g_i · g_j (see :mod:`stiffmon_agent.metrics.gram`) and are pure.

* Cosine stiffness S_cos(i, j) = g_i · g_j / (‖g_i‖ ‖g_j‖). If either gradient is exactly zero
  the cosine is undefined and the entry is NaN; NaN entries are left out of every mean below.
* Sign stiffness S_sign(i, j) = sign(g_i · g_j) ∈ {-1, 0, 1}.
* Class stiffness C[a, b] = mean of S(i, j) over i in class a (rows), j in class b (columns),
  i ≠ j when rows and columns are the same examples; NaN where no pair exists (e.g. the diagonal
  entry of a class with one example).
* Stiffness against distance: mean S(i, j) per distance bin over pairs i ≠ j, and the critical
  length ξ, the first distance at which the binned mean crosses zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def cosine_stiffness(gram: Tensor) -> Tensor:
    """S_cos = G / (‖g‖ ‖g‖ᵀ); NaN where a gradient norm is zero.

    Args:
        gram: (N, N) Gram matrix of one set, or (N, M) cross Gram G[i, j] = g_i · h_j with
            ``norms`` equal on both sides — for a cross block use :func:`cosine_block`.
    """
    norms = gram.diagonal().clamp_min(0).sqrt()
    return cosine_block(gram, norms, norms)


def cosine_block(cross: Tensor, row_norms: Tensor, col_norms: Tensor) -> Tensor:
    """Cosine stiffness of a block G[I, J] given the norms of the row and column gradients."""
    denom = row_norms[:, None] * col_norms[None, :]
    out = cross / denom
    return torch.where(denom > 0, out, torch.full_like(out, float("nan")))


def mean_pair_cosine(gram: Tensor) -> float:
    r"""Mean cosine stiffness over the pairs i ≠ j whose gradients are both non-zero.

    With v_i = 1/‖g_i‖ (0 for a zero gradient) and k such examples,

        mean = (vᵀ G v − Σ_i G_ii v_i²) / (k (k − 1)),

    two matrix-vector products instead of the N × N cosine matrix and a mask: the same number
    as ``nanmean`` of :func:`cosine_stiffness` off the diagonal (NaN if fewer than two
    gradients are non-zero).

    Args:
        gram: (N, N) Gram matrix (float64 recommended).
    """
    d = gram.diagonal()
    ok = d > 0
    k = int(ok.sum())
    if k < 2:
        return math.nan
    v = torch.where(ok, d.clamp_min(torch.finfo(d.dtype).tiny).rsqrt(), torch.zeros_like(d))
    total = v @ (gram @ v) - (d * v * v).sum()
    return float(total) / (k * (k - 1))


def sign_stiffness(gram: Tensor) -> Tensor:
    """S_sign = sign(G), with sign(0) = 0."""
    return torch.sign(gram)


@dataclass(frozen=True)
class ClassStiffness:
    """Class stiffness matrix and its summaries.

    Attributes:
        matrix: C over ``classes`` × ``classes``; NaN where no pair exists.
        counts: Number of pairs behind each entry.
        within: Mean of the diagonal (NaN-aware): how much a step on a class helps that class.
        between: Mean of the off-diagonal entries (NaN-aware).
        classes: The class index of each row (and column) of ``matrix``: 0..K−1 for the full
            K × K matrix, or only the classes with probe examples for a compact one.
    """

    matrix: Tensor
    counts: Tensor
    within: float
    between: float
    classes: Tensor | None = None


def class_stiffness(
    stiffness: Tensor,
    row_labels: Tensor,
    col_labels: Tensor | None = None,
    num_classes: int | None = None,
    *,
    classes: Tensor | None = None,
) -> ClassStiffness:
    """Class stiffness C[a, b] = mean over i ∈ a, j ∈ b, i ≠ j of S(i, j).

    The sums run over the classes that have examples only (at most N + M of them, however
    many classes the model has), so the cost is O(N M + m²) for m such classes, not O(N M K):
    the rows and columns of other classes have no pair and are NaN.

    Args:
        stiffness: (N, M) pairwise stiffness (cosine or sign).
        row_labels: (N,) integer class of each row example.
        col_labels: (M,) class of each column example; None means the columns are the same
            examples as the rows (then i = j pairs are excluded).
        num_classes: Number of classes K (default: 1 + the largest label).
        classes: Sorted class indices the matrix is over (a compact matrix, e.g. the classes
            present in a probe); None gives the full K × K matrix.
    """
    same = col_labels is None
    cols = row_labels if col_labels is None else col_labels
    if same and stiffness.shape[0] != stiffness.shape[1]:
        raise ValueError("a same-set stiffness matrix must be square")
    k = num_classes if num_classes is not None else int(max(row_labels.max(), cols.max())) + 1
    s = stiffness.to(torch.float64)
    dev = s.device
    rl, cl = row_labels.long().to(dev), cols.long().to(dev)
    present = torch.unique(torch.cat([rl, cl]))
    m = present.numel()
    valid = ~torch.isnan(s)
    if same:
        valid &= ~torch.eye(s.shape[0], dtype=torch.bool, device=dev)
    cell = torch.searchsorted(present, rl)[:, None] * m + torch.searchsorted(present, cl)[None, :]
    cell, vals = cell[valid], s[valid]  # each valid pair's (row class, column class) cell
    sums_p = torch.bincount(cell, weights=vals, minlength=m * m).reshape(m, m).to(s)
    counts_p = torch.bincount(cell, minlength=m * m).reshape(m, m).to(s)
    mean_p = torch.where(
        counts_p > 0, sums_p / counts_p.clamp_min(1), torch.full_like(sums_p, float("nan"))
    )
    diag = mean_p.diagonal()
    off = mean_p[~torch.eye(m, dtype=torch.bool, device=dev)]
    within, between = _nanmean(diag), _nanmean(off)
    out = torch.arange(k, device=dev) if classes is None else classes.long().to(dev)
    pos = torch.searchsorted(out, present).clamp_max(max(out.numel() - 1, 0))
    if out.numel() == 0 or not bool((out[pos] == present).all()):
        raise ValueError("the labels have classes outside `classes` / num_classes")
    matrix = torch.full((out.numel(), out.numel()), float("nan"), dtype=s.dtype, device=dev)
    counts = torch.zeros((out.numel(), out.numel()), dtype=torch.long, device=dev)
    matrix[pos[:, None], pos[None, :]] = mean_p
    counts[pos[:, None], pos[None, :]] = counts_p.round().long()
    return ClassStiffness(matrix, counts, within, between, out)


def _nanmean(x: Tensor) -> float:
    ok = ~torch.isnan(x)
    return float(x[ok].mean()) if bool(ok.any()) else float("nan")


@dataclass(frozen=True)
class StiffnessBlocks:
    """Class stiffness for the train–train, train–val and val–val blocks of a joint probe."""

    train_train: ClassStiffness
    train_val: ClassStiffness | None
    val_val: ClassStiffness | None


def stiffness_blocks(
    stiffness: Tensor,
    labels: Tensor,
    n_train: int,
    num_classes: int | None = None,
    *,
    compact: bool = False,
) -> StiffnessBlocks:
    """Split a joint (train ∪ val) stiffness matrix into the three class-stiffness blocks.

    Args:
        stiffness: (N, N) stiffness over the train probe followed by the val probe.
        labels: (N,) labels in the same order.
        n_train: Number of train-probe examples (the first ``n_train`` rows).
        num_classes: Number of classes.
        compact: Give each block over the classes present in the probe (train ∪ val, the same
            classes for the three blocks, in ``ClassStiffness.classes``) instead of all K: with
            ImageNet-21k's K = 21,843 and a probe of 512, a 512 × 512 matrix instead of a
            21,843² one (3.8 GB in float64) that is NaN but for the probe's classes. The
            entries and the within / between means are the same numbers.
    """
    k = num_classes if num_classes is not None else int(labels.max()) + 1
    t, v = slice(0, n_train), slice(n_train, None)
    lt, lv = labels[t], labels[v]
    has_val = labels.shape[0] > n_train
    cls = torch.unique(labels.long()) if compact else None
    return StiffnessBlocks(
        train_train=class_stiffness(stiffness[t, t], lt, None, k, classes=cls),
        train_val=class_stiffness(stiffness[t, v], lt, lv, k, classes=cls) if has_val else None,
        val_val=class_stiffness(stiffness[v, v], lv, None, k, classes=cls) if has_val else None,
    )


def class_labels_of_matrix(cs: ClassStiffness, names: Sequence[str]) -> tuple[str, ...]:
    """Labels of a class-stiffness matrix's rows (and columns): the class names of its
    ``classes`` where the run has names, else the class indices as text (``()`` for a full
    matrix without names, whose row i is class i)."""
    if cs.classes is None:
        return tuple(names)
    idx = cs.classes.tolist()
    if names:
        return tuple(names[i] for i in idx)
    if idx == list(range(cs.matrix.shape[0])):
        return ()
    return tuple(str(i) for i in idx)


def pairwise_distances(x: Tensor, normalise: bool = True) -> Tensor:
    """Euclidean distances between flattened examples, optionally after scaling each to unit norm.

    With ``normalise`` (the default, used for stiffness against distance) every example x_i is
    flattened and divided by ‖x_i‖, so distances lie in [0, 2] and compare across inputs and
    layers of different scale; an all-zero example stays zero.
    """
    flat = x.reshape(x.shape[0], -1).to(torch.float64)
    if normalise:
        norms = flat.norm(dim=1, keepdim=True)
        flat = torch.where(norms > 0, flat / norms.clamp_min(1e-300), flat)
    sq = (flat * flat).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T
    d = d2.clamp_min(0).sqrt()
    d.fill_diagonal_(0.0)
    return d


@dataclass(frozen=True)
class DistanceCurve:
    """Mean stiffness per distance bin.

    Attributes:
        centers: Bin centres (n_bins,).
        edges: Bin edges (n_bins + 1,).
        mean: Mean stiffness of the pairs in each bin (NaN for an empty bin).
        counts: Pairs per bin.
        xi: Critical length: first zero crossing of ``mean`` (None if there is none).
    """

    centers: Tensor
    edges: Tensor
    mean: Tensor
    counts: Tensor
    xi: float | None


def stiffness_vs_distance(
    stiffness: Tensor,
    distances: Tensor,
    bins: int | Sequence[float] | Tensor = 20,
    *,
    max_distance: float | None = None,
) -> DistanceCurve:
    """Bin the pairs i < j of a same-set stiffness matrix by distance and average per bin.

    Args:
        stiffness: (N, N) pairwise stiffness (NaN entries are skipped).
        distances: (N, N) pairwise distances, e.g. from :func:`pairwise_distances`.
        bins: Number of equal-width bins on [0, max_distance], or explicit edges.
        max_distance: Upper edge for equal-width bins (default: the largest distance).
    """
    n = stiffness.shape[0]
    iu = torch.triu_indices(n, n, offset=1, device=stiffness.device)
    s = stiffness[iu[0], iu[1]].to(torch.float64)
    d = distances[iu[0], iu[1]].to(torch.float64)
    keep = ~torch.isnan(s)
    s, d = s[keep], d[keep]
    if isinstance(bins, int):
        top = max_distance if max_distance is not None else (float(d.max()) if d.numel() else 1.0)
        edges = torch.linspace(0.0, top if top > 0 else 1.0, bins + 1, dtype=torch.float64)
    else:
        edges = torch.as_tensor(bins, dtype=torch.float64)
    edges = edges.to(s.device)
    nb = edges.numel() - 1
    idx = torch.bucketize(d, edges[1:-1], right=True)  # bin k holds edges[k] <= d < edges[k+1]
    inside = (d >= edges[0]) & (d <= edges[-1])
    idx, sv = idx[inside], s[inside]
    sums = torch.zeros(nb, dtype=torch.float64, device=s.device).index_add_(0, idx, sv)
    counts = torch.zeros(nb, dtype=torch.float64, device=s.device).index_add_(
        0, idx, torch.ones_like(sv)
    )
    mean = torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, float("nan")))
    centers = 0.5 * (edges[:-1] + edges[1:])
    return DistanceCurve(
        centers=centers,
        edges=edges,
        mean=mean,
        counts=counts.long(),
        xi=critical_length(centers, mean),
    )


def critical_length(centers: Tensor, mean: Tensor) -> float | None:
    """First distance where the binned mean stiffness crosses zero, by linear interpolation.

    Empty (NaN) bins are skipped. A bin whose mean is exactly 0 is the crossing itself; otherwise
    the crossing lies between the first two consecutive non-empty bins whose means have opposite
    signs. Returns None if the mean never changes sign.
    """
    xs = [float(c) for c, m in zip(centers, mean, strict=True) if not torch.isnan(m)]
    ys = [float(m) for m in mean if not torch.isnan(m)]
    for k, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if y == 0.0:
            return x
        if k and (ys[k - 1] > 0) != (y > 0):
            x0, y0 = xs[k - 1], ys[k - 1]
            return x0 + (x - x0) * y0 / (y0 - y)
    return None
