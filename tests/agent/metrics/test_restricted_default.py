"""When a sharpness measurement is restricted to the touched embedding rows by default: only
where the untouched rows hold at least ``RESTRICT_MIN`` parameters. A smaller model is solved
whole, as a sharded measurement (which never restricts) solves it, so the two agree to rounding
(the restricted and the whole solve stop at different Lanczos iterates within ``tol``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stiffmon_agent.metrics import restricted
from stiffmon_agent.metrics.sharpness import hessian_eigen
from tests.agent.metrics.test_restricted_embedding import CE, TIGHT, Rec, _dim, _probe


def test_a_small_table_is_solved_whole_by_default() -> None:
    torch.manual_seed(0)
    model = Rec().double()
    x, y = _probe()
    res = hessian_eigen(model, x, y, CE, k=2, **TIGHT)  # type: ignore[arg-type]
    assert res.warm_start.shape[0] == _dim(model)


def test_untouched_rows_past_the_threshold_are_restricted_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    model = Rec().double()
    x, y = _probe()
    whole = hessian_eigen(model, x, y, CE, k=2, **TIGHT)  # type: ignore[arg-type]
    monkeypatch.setattr(restricted, "RESTRICT_MIN", 100)  # ≥ 330 untouched of 381 table numbers
    res = hessian_eigen(model, x, y, CE, k=2, **TIGHT)  # type: ignore[arg-type]
    assert res.warm_start.shape[0] < _dim(model)
    assert float((res.eigenvalues - whole.eigenvalues).abs().max()) <= 1e-9 * float(
        whole.eigenvalues.abs().max()
    )
    monkeypatch.setattr(restricted, "RESTRICT_MIN", 10_000)
    assert hessian_eigen(model, x, y, CE, k=2, **TIGHT).warm_start.shape[0] == _dim(model)  # type: ignore[arg-type]


def test_the_count_is_of_embedding_tables() -> None:
    assert restricted.table_parameters(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))) == 40
