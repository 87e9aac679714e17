"""Data that ships with the install: scikit-learn's 8×8 handwritten digits (1,797 images).

Split deterministically into train / validation / test; fixed probes of ``per_class`` examples of
each class are drawn from train and validation. Optional label noise replaces a fraction of the
training labels by uniformly random ones (Arpit et al. 2017's memorisation study).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DIGIT_NAMES = tuple(str(i) for i in range(10))


@dataclass(frozen=True)
class Split:
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    probe_train: tuple[Tensor, Tensor]
    probe_val: tuple[Tensor, Tensor]
    class_names: tuple[str, ...]


def _per_class(x: Tensor, y: Tensor, k: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    idx = []
    for c in range(int(y.max()) + 1):
        where = torch.nonzero(y == c).flatten()
        idx.append(where[torch.randperm(where.numel(), generator=g)[:k]])
    sel = torch.cat(idx)
    return x[sel], y[sel]


def load_digits_split(
    *, seed: int = 0, per_class: int = 10, label_noise: float = 0.0, image: bool = True
) -> Split:
    """Digits scaled to [0, 1] and standardised, as (N, 1, 8, 8) images or (N, 64) vectors.

    Args:
        seed: Seed of the split, the probes and the label noise.
        per_class: Probe examples per class (train and validation probes each).
        label_noise: Fraction of training labels replaced by random labels (probes included:
            the train probe then shows what memorisation does to stiffness).
        image: Shape (N, 1, 8, 8) if True, else (N, 64).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    x = (x - 0.3) / 0.4
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    n_val = 360
    xv, yv, xt, yt = x[:n_val], y[:n_val], x[n_val:], y[n_val:].clone()
    if label_noise > 0:
        flip = torch.rand(len(yt), generator=g) < label_noise
        yt[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)
    if image:
        xt, xv = xt.unsqueeze(1), xv.unsqueeze(1)
    else:
        xt, xv = xt.reshape(len(xt), -1), xv.reshape(len(xv), -1)
    return Split(
        xt,
        yt,
        xv,
        yv,
        _per_class(xt, yt, per_class, g),
        _per_class(xv, yv, per_class, g),
        DIGIT_NAMES,
    )
