"""Class stiffness with ImageNet-scale class counts (21,843 classes, a probe of 64 examples).

Most classes have no probe example and many have one. The compact matrix is over the probe's
classes only and must hold the same numbers as a float64 loop over the example pairs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from stiffmon_agent.metrics.stiffness import (
    class_labels_of_matrix,
    class_stiffness,
    cosine_stiffness,
    sign_stiffness,
    stiffness_blocks,
)
from tests.agent.metrics.reference import loop_gradients

K = 21_843


def _probe(n: int, n_val: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, K)).double()
    x = torch.randn(n + n_val, 6, dtype=torch.float64)
    y = torch.randint(0, K, (n + n_val,))
    y[1] = y[2] = y[0]  # a class with three train examples
    y[n] = y[0]  # and one val example of it
    y[n + 1] = y[3]  # a train class that has one val example too
    grads = loop_gradients(model, x, y, nn.CrossEntropyLoss())
    return model, grads @ grads.T, y, x


def _reference(s: torch.Tensor, y: list[int], rows: range, cols: range, same: bool) -> dict:
    cells: dict[tuple[int, int], list[float]] = {}
    for i in rows:
        for j in cols:
            if (same and i == j) or math.isnan(float(s[i, j])):
                continue
            cells.setdefault((y[i], y[j]), []).append(float(s[i, j]))
    return {c: sum(v) / len(v) for c, v in cells.items()}


def test_compact_blocks_of_21843_classes_match_a_float64_pair_loop() -> None:
    n, nv = 48, 16
    _, gram, y, _ = _probe(n, nv)
    names = [f"n{i:08d}" for i in range(K)]
    yl = y.tolist()
    for stiff in (cosine_stiffness(gram), sign_stiffness(gram)):
        blocks = stiffness_blocks(stiff, y, n, K, compact=True)
        present = sorted(set(yl))
        for cs, rows, cols, same in (
            (blocks.train_train, range(n), range(n), True),
            (blocks.train_val, range(n), range(n, n + nv), False),
            (blocks.val_val, range(n, n + nv), range(n, n + nv), True),
        ):
            assert cs is not None
            assert cs.classes is not None and cs.classes.tolist() == present
            assert cs.matrix.shape == (len(present), len(present))  # not 21,843²
            ref = _reference(stiff, yl, rows, cols, same)
            at = {c: i for i, c in enumerate(present)}
            for (a, b), v in ref.items():
                assert abs(float(cs.matrix[at[a], at[b]]) - v) <= 1e-12
            assert int((~torch.isnan(cs.matrix)).sum()) == len(ref)  # the rest: no pair
            within = [v for (a, b), v in ref.items() if a == b]
            between = [v for (a, b), v in ref.items() if a != b]
            if within:
                assert abs(cs.within - sum(within) / len(within)) <= 1e-12
            else:  # no class with two examples in this block (val–val): no diagonal entry
                assert math.isnan(cs.within)
            assert abs(cs.between - sum(between) / len(between)) <= 1e-12
            labels = class_labels_of_matrix(cs, names)
            assert labels == tuple(names[c] for c in present)
        tt = blocks.train_train
        single = yl[4]  # one train example (y[4] is almost surely alone): no i ≠ j pair
        if yl[:n].count(single) == 1:
            i = present.index(single)
            assert math.isnan(float(tt.matrix[i, i])) and int(tt.counts[i, i]) == 0


def test_full_and_compact_matrices_agree_where_both_have_cells() -> None:
    n = 40
    _, gram, y, _ = _probe(n, 2)
    y = y[:n] % 1000
    s = cosine_stiffness(gram[:n, :n])
    full = class_stiffness(s, y, num_classes=1000)
    present = torch.unique(y)
    compact = class_stiffness(s, y, num_classes=1000, classes=present)
    assert full.matrix.shape == (1000, 1000)
    assert torch.equal(full.matrix[present][:, present].isnan(), compact.matrix.isnan())
    ok = ~compact.matrix.isnan()
    assert torch.equal(full.matrix[present][:, present][ok], compact.matrix[ok])
    assert (full.within, full.between) == (compact.within, compact.between)
    assert class_labels_of_matrix(compact, ()) == tuple(str(c) for c in present.tolist())
