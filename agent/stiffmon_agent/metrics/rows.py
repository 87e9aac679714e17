"""A growing stack of vectors of length P: memory for the vectors held, not for a budget.

The Lanczos basis Q_m and its products A Q_m grow by one vector per product. Allocating them for
the whole product budget up front (``max_matvecs`` columns each) costs 2 · budget · P numbers
although a warm start converges in a handful of products; :class:`GrowingRows` holds the m
vectors as the rows of a (capacity, P) tensor whose capacity doubles when full (starting small),
so it holds at most 2 m vectors (3 m for a moment while it grows), and ``rows()`` is one
contiguous (m, P) view, as fast in matrix products as a preallocated block.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["START_ROWS", "GrowingRows"]

START_ROWS = 8
"""Rows held before the first growth: a warm start (2 vectors) converges in ~6 products."""


class GrowingRows:
    """Vectors of length ``dim`` appended one at a time, held as rows of a growing tensor.

    Args:
        dim: Length P of each vector.
        like: Tensor giving dtype and device.
        limit: Most vectors that will ever be appended (the capacity never exceeds it).
        start: Capacity before the first growth.
    """

    def __init__(self, dim: int, like: Tensor, limit: int, start: int = START_ROWS) -> None:
        self.dim = dim
        self.limit = max(1, limit)
        self.m = 0
        self._data = torch.empty(
            min(max(1, start), self.limit), dim, dtype=like.dtype, device=like.device
        )

    @property
    def capacity(self) -> int:
        """Rows allocated now."""
        return int(self._data.shape[0])

    def append(self, v: Tensor) -> None:
        """Add ``v`` (shape (P,)) as the next row, doubling the capacity if it is full."""
        if self.m == self.capacity:
            grown = torch.empty(
                min(2 * self.capacity, self.limit),
                self.dim,
                dtype=self._data.dtype,
                device=self._data.device,
            )
            grown[: self.m] = self._data[: self.m]
            self._data = grown
        self._data[self.m] = v
        self.m += 1

    def rows(self) -> Tensor:
        """The (m, P) vectors appended so far (a view)."""
        return self._data[: self.m]

    def __getitem__(self, j: int) -> Tensor:
        return self._data[: self.m][j]
