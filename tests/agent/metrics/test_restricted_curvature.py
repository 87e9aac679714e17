"""Hessian trace and spectral density restricted to the embedding rows the probe touches.

H = H_TT ⊕ 0_UU, so tr(H) = tr(H_TT) and the density is (|T|/P) φ_TT + (|U|/P) δ_0. Each number
is checked in float64 against the dense Hessian of all P parameters (``torch.func.hessian``):

* exactly, with the probe vectors replaced by all rows of a Hadamard matrix (Σ z zᵀ = n I, so
  the mean of zᵀ A^k z is tr(A^k) with no sampling error): the SLQ moments ∫ t^k dφ, k = 0..3,
  equal tr(H^k)/P, restricted and whole;
* statistically, with Rademacher probes from a fixed seed: the trace within 4 of its own
  published standard errors, that standard error within 20 % of the exact one, and each
  restricted sample equal to the whole operator's for the same signs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from stiffmon_agent.measure_curvature import density_messages
from stiffmon_agent.metrics import HessianOperator, measurement_mode, restricted
from stiffmon_agent.metrics import density as density_mod
from stiffmon_agent.metrics.density import spectral_density, with_zero_block
from stiffmon_agent.metrics.restricted_curvature import touched_operator
from tests.agent.metrics.test_restricted_embedding import CE, Rec, _dense_h, _dim, _probe


def _hadamard(n: int) -> Tensor:
    """Sylvester's Hadamard matrix of order n (a power of 2): Hᵀ H = n I."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.fixture
def hadamard_probes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Replace SLQ's Rademacher starts by the rows of a Hadamard matrix (first ``dim``
    columns); yields a list that receives each operator dimension asked for."""
    dims: list[int] = []
    state: dict[str, object] = {}

    def rows(dim: int, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if state.get("dim") != dim:
            n = 1 << max(0, math.ceil(math.log2(dim)))
            state.update(dim=dim, rows=iter(_hadamard(n)[:, :dim]))
            dims.append(dim)
        row: Tensor = next(state["rows"])  # type: ignore[call-overload]
        return row.to(like)

    monkeypatch.setattr(density_mod, "rademacher", rows)
    yield dims


def _slq(model: nn.Module, x: Tensor, y: Tensor, restrict: bool, runs: int, **kw: object):  # type: ignore[no-untyped-def]
    def build() -> HessianOperator:
        return HessianOperator(model, x, y, CE)

    with measurement_mode(model), touched_operator(model, build, restrict=restrict) as (op, rs):
        res = spectral_density(op, op.dim, runs=runs, like=op.like.detach(), **kw)  # type: ignore[arg-type]
        return res if rs is None else with_zero_block(res, op.dim + rs.untouched)


@pytest.mark.parametrize("restrict", [True, False])
def test_moments_with_all_hadamard_probes_equal_the_dense_traces(
    hadamard_probes: list[int], restrict: bool
) -> None:
    torch.manual_seed(0)
    model = Rec().double()
    x, y = _probe()
    h = _dense_h(model, x, y)
    big = _dim(model)
    lam = torch.linalg.eigvalsh((h + h.T) / 2)
    small = 72 if restrict else big  # |T| ≤ 21 + 9·3 + 8·3
    n = 1 << math.ceil(math.log2(small))
    res = _slq(model, x, y, restrict, runs=n, steps=4)
    (solved,) = hadamard_probes
    assert (solved < big) == restrict and res.dim == big and res.runs == n >= solved
    if restrict:
        assert res.zero_mass == pytest.approx((big - solved) / big, rel=1e-15)
        assert res.solved_dim == solved
    for k in range(4):  # 4 Gauss nodes: exact to degree 7
        ours = float(res.moment(k).mean())
        ref = float((lam**k).sum()) / big
        assert abs(ours - ref) <= 1e-10 * max(abs(ref), float(lam.abs().max()) ** k / big), k
    assert res.trace.mean == pytest.approx(float(h.trace()), rel=1e-10)


def test_restricted_samples_are_the_whole_operators_samples() -> None:
    """zᵀ H z over all P equals z_Tᵀ H_TT z_T: same distribution, same variance."""
    torch.manual_seed(0)
    model = Rec().double()
    x, y = _probe()
    h = _dense_h(model, x, y)
    g = torch.Generator().manual_seed(5)

    def build() -> HessianOperator:
        return HessianOperator(model, x, y, CE)

    with measurement_mode(model):
        whole = build()
        with touched_operator(model, build, restrict=True) as (op, rs):
            assert rs is not None and op.dim + rs.untouched == whole.dim
            for _ in range(5):
                z = torch.randint(0, 2, (whole.dim,), generator=g).double() * 2 - 1
                zt = rs.gather(z, whole.names, whole.sizes)
                ours, ref = float(zt @ op(zt)), float(z @ h @ z)
                assert ours == pytest.approx(ref, rel=1e-12, abs=1e-14)


def test_trace_is_within_its_own_published_error() -> None:
    torch.manual_seed(0)
    model = Rec().double()
    x, y = _probe()
    h = _dense_h(model, x, y)
    exact = float(h.trace())
    off = h - torch.diag(torch.diag(h))
    m = 1 + 399
    true_stderr = math.sqrt(2 * float((off**2).sum()) / m)
    res = _slq(
        model, x, y, True, runs=1, steps=2, trace_samples=399,
        generator=torch.Generator().manual_seed(11),
    )  # fmt: skip
    assert res.solved_dim is not None and res.solved_dim < _dim(model)
    assert res.trace.samples == m
    assert abs(res.trace.mean - exact) <= 4 * res.trace.stderr
    assert 0.8 <= res.trace.stderr / true_stderr <= 1.25


def _published(msgs: list) -> tuple[dict, Tensor, Tensor, dict]:  # type: ignore[type-arg]
    curve = next(m.fields for m in msgs if m.fields.get("name") == "hessian-density")
    sc = next(m.fields for m in msgs if "values_names" in m.fields)
    vals = dict(zip(sc["values_names"], sc["values_raw"], strict=True))
    return curve["attrs"], torch.as_tensor(curve["x"]), torch.as_tensor(curve["y"]), vals


def test_density_messages_restrict_past_the_threshold_and_publish_the_whole_density(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    model = Rec().double()
    x, y = _probe()
    h = _dense_h(model, x, y)
    big = _dim(model)

    def run(**kw: object) -> list:  # type: ignore[type-arg]
        opts: dict = {"runs": 8, "steps": 12, "trace_samples": 0, "points": 2048}  # type: ignore[type-arg]
        opts["generator"] = torch.Generator().manual_seed(2)
        return density_messages(model, CE, None, 0, train=(x, y), **opts, **kw)  # type: ignore[arg-type]

    attrs, *_ = _published(run())  # default: 381 table numbers < RESTRICT_MIN, whole
    assert attrs["solved_dim"] == big and attrs["zero_mass"] == 0.0
    monkeypatch.setattr(restricted, "RESTRICT_MIN", 100)
    attrs, *_ = _published(run(wrap=lambda op: op))  # sharded: never restricted
    assert attrs["solved_dim"] == big
    attrs, grid, dens, vals = _published(run())
    solved = attrs["solved_dim"]
    assert attrs["dim"] == big and solved < big
    assert attrs["zero_mass"] == pytest.approx((big - solved) / big, rel=1e-15)
    assert attrs["ritz_min"] <= 0.0 <= attrs["ritz_max"]
    # The published curve: mass 1 (the atom included); its mean is the runs' trace / P.
    mass = float(torch.trapezoid(dens, grid))
    assert mass == pytest.approx(1.0, abs=1e-3)
    mean = float(torch.trapezoid(dens * grid, grid))
    assert mean == pytest.approx(vals["curvature/trace"] / big, rel=1e-3)
    assert abs(vals["curvature/trace"] - float(h.trace())) <= 4 * vals["curvature/trace_stderr"]
