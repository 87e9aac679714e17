"""The sharpness measurement checks that its Hessian-vector products are symmetric.

torch's fused ``_weight_norm`` has a wrong double backward: the Hessian it implies is not
symmetric and λ1_H comes out wrong with nothing but ``converged: false`` to say so. The
measurements compute ``torch.nn.utils.weight_norm`` and its parametrization in plain ops
(:mod:`~stiffmon_agent.metrics.plain_weight_norm`, tested in ``test_plain_weight_norm``), so
the case left is a layer that calls ``torch._weight_norm`` itself. The check (vᵀHw against wᵀHv
for random v, w) must catch that, and stay quiet on plain models in float32 and float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from stiffmon import protocol as p
from stiffmon_agent.measure import SharpnessState, make_probe, sharpness_messages
from stiffmon_agent.metrics import EigenResult, HessianOperator, hessian_eigen, lanczos
from stiffmon_agent.metrics.symmetry import (
    SymmetryCheck,
    check_symmetry,
    symmetry_defect,
    symmetry_tolerance,
)
from stiffmon_agent.outgoing import Outgoing
from tests.agent.metrics.models import well_fit_float32_mlp
from tests.agent.metrics.reference import dense_hessian_of

CE = nn.CrossEntropyLoss()


def _operator(dim: int, skew: float, dtype: torch.dtype) -> Tensor:
    """S + skew · K: S symmetric with eigenvalues ~1, K antisymmetric of the same size."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
    b = torch.randn(dim, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
    return ((a + a.T) / 2 + skew * (b - b.T) / 2).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_check_symmetry_on_hand_made_operators(dtype: torch.dtype) -> None:
    """Symmetric: defect at rounding level; an antisymmetric part of 10 % (float64 also 1e-4)
    of the operator: caught; the defect does not shrink with the dimension. (One random pair:
    vᵀKw is a random variable, so a pair can miss; the seeds here are fixed.)"""
    like = torch.zeros((), dtype=dtype)

    def check(a: Tensor) -> SymmetryCheck:
        gen = torch.Generator().manual_seed(1)
        return check_symmetry(lambda v: a @ v, a.shape[0], like=like, generator=gen)

    for dim in (40, 4000):
        got = check(_operator(dim, 0.0, dtype))
        assert got.matvecs == 2 and got.symmetric is True, got
        assert got.defect < 1e-3 * got.tolerance, got
        assert got.tolerance == symmetry_tolerance(dtype)
        for skew in (1e-1, 1e-4) if dtype == torch.float64 else (1e-1,):
            bad = check(_operator(dim, skew, dtype))
            assert bad.symmetric is False, (dim, skew, bad)
            assert 0.05 * skew < bad.defect < 10 * skew, (dim, skew, bad)  # ~ ‖K‖_F / ‖A‖_F


def test_check_symmetry_reuses_given_products_and_says_unknown_when_not_finite() -> None:
    a = _operator(30, 0.1, torch.float64)
    gen = torch.Generator().manual_seed(2)
    v, w = torch.randn(30, generator=gen, dtype=torch.float64), torch.randn(30, generator=gen)
    w = w.double()
    calls: list[Tensor] = []

    def matvec(x: Tensor) -> Tensor:
        calls.append(x)
        return a @ x

    got = check_symmetry(matvec, 30, products=((v, a @ v), (w, a @ w)))
    assert not calls and got.matvecs == 0 and got.symmetric is False
    assert got.defect == pytest.approx(symmetry_defect(v, a @ v, w, a @ w), rel=0)
    nan = torch.full((30,), math.nan, dtype=torch.float64)
    assert check_symmetry(matvec, 30, products=((v, nan), (w, a @ w))).symmetric is None
    assert symmetry_defect(v, 0 * v, w, 0 * w) == 0.0


def _tiny(kind: str, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, Tensor, Tensor]:
    """Linear(4, 6) (with weight norm: a parametrization calling the fused
    ``torch._weight_norm`` itself, or plain tensor ops; "none": without), tanh, Linear(6, 3);
    15 examples."""
    torch.manual_seed(5)
    lin = nn.Linear(4, 6)
    if kind == "fused":
        parametrize.register_parametrization(lin, "weight", _FusedWeightNorm(), unsafe=True)
    elif kind == "plain":
        parametrize.register_parametrization(lin, "weight", _PlainWeightNorm(), unsafe=True)
    model = nn.Sequential(lin, nn.Tanh(), nn.Linear(6, 3)).to(dtype)
    return model, torch.randn(15, 4, dtype=dtype), torch.randint(0, 3, (15,))


class _FusedWeightNorm(nn.Module):
    """w = g v / ‖v‖ row by row, with torch's fused kernel (a wrong double backward)."""

    def forward(self, g: Tensor, v: Tensor) -> Tensor:
        return torch._weight_norm(v, g, 0)

    def right_inverse(self, w: Tensor) -> tuple[Tensor, Tensor]:
        return w.norm(dim=1, keepdim=True), w


class _PlainWeightNorm(nn.Module):
    """w = g v / ‖v‖ row by row, with plain tensor ops (a correct double backward)."""

    def forward(self, g: Tensor, v: Tensor) -> Tensor:
        w: Tensor = g * v / v.norm(dim=1, keepdim=True)
        return w

    def right_inverse(self, w: Tensor) -> tuple[Tensor, Tensor]:
        return w.norm(dim=1, keepdim=True), w


def _measure(
    model: nn.Module, x: Tensor, y: Tensor, steps: int = 2
) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """Events and ``hessian`` spectra of ``steps`` sharpness measurements (warm after the
    first, so only the first checks symmetry), as the agent runs them."""
    probe = make_probe((x, y), None, None, None, None)
    state = SharpnessState()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    msgs: list[Outgoing] = []
    for step in range(steps):
        out, _ = sharpness_messages(
            model, CE, probe, step, opt, state=state, generator=gen, tol=1e-6, max_hvps=200
        )
        msgs += out
    events = [m.fields for m in msgs if m.cls is p.Event]
    spectra = [m.fields for m in msgs if m.cls is p.Spectrum and m.fields["name"] == "hessian"]
    return events, spectra


def test_the_fused_weight_norm_s_asymmetric_hessian_is_reported() -> None:
    model, x, y = _tiny("fused")
    events, spectra = _measure(model, x, y)
    asym = [e for e in events if e["code"] == "hessian-asymmetric"]
    assert len(asym) == 1 and asym[0]["level"] == "warning", events  # said once
    message = str(asym[0]["message"])
    assert "not symmetric" in message and "weight_norm" in message and "λ1_H" in message
    assert "register_parametrization" in message
    first, warm = spectra[0]["attrs"], spectra[1]["attrs"]  # still published, marked
    assert isinstance(first, dict) and first["symmetric"] is False
    assert first["asymmetry"] > 1e3 * symmetry_tolerance(torch.float64)
    assert isinstance(warm, dict) and "symmetric" not in warm  # a warm start: not checked
    assert all(math.isfinite(float(s["values"][0])) for s in spectra)  # type: ignore[index]


def test_weight_norm_in_plain_tensor_ops_is_symmetric_and_right() -> None:
    """What the event suggests: no event, and λ1_H equal to the dense Hessian's."""
    model, x, y = _tiny("plain")
    events, spectra = _measure(model, x, y)
    assert not [e for e in events if e["code"] == "hessian-asymmetric"]
    assert spectra[0]["attrs"]["symmetric"] is True  # type: ignore[index]
    model.eval()
    ref = torch.linalg.eigvalsh(dense_hessian_of(model, x, lambda out: CE(out, y)))[-1]
    assert float(spectra[-1]["values"][0]) == pytest.approx(float(ref), rel=1e-6)  # type: ignore[index]


@pytest.mark.parametrize(
    "make",
    [
        lambda: _tiny("none", torch.float64),
        lambda: _tiny("none", torch.float32),
        well_fit_float32_mlp,
    ],
    ids=["mlp-float64", "mlp-float32", "well-fit-mlp-float32"],
)
def test_no_false_alarm_on_plain_models(
    make: Callable[[], tuple[nn.Module, Tensor, Tensor]],
) -> None:
    model, x, y = make()
    events, spectra = _measure(model, x, y, steps=3)
    assert not [e for e in events if e["code"] == "hessian-asymmetric"], events
    attrs = spectra[0]["attrs"]
    assert isinstance(attrs, dict) and attrs["symmetric"] is True
    assert attrs["asymmetry"] < 0.1 * symmetry_tolerance(x.dtype), attrs
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):  # and the two-product check of warm solves
        got = hessian_eigen(model, x, y, CE, max_hvps=1, generator=gen, symmetry_check=True)
        assert got.symmetry is not None and got.symmetry.symmetric is True, got.symmetry
        assert got.symmetry.defect < 0.1 * symmetry_tolerance(x.dtype)


def test_the_check_s_products_are_counted() -> None:
    """A cold start checks on its random start block (no product); a warm one does not unless
    asked, and then computes two more products, which ``matvecs`` (the published ``hvps``)
    counts; a warm start checked by a cold one carries the cold one's check."""
    model, x, y = _tiny("none")
    calls = [0]

    def wrap(op: HessianOperator) -> Callable[[Tensor], Tensor]:
        def hv(v: Tensor) -> Tensor:
            calls[0] += 1
            return op(v)

        return hv

    def run(**kw: object) -> EigenResult:
        calls[0] = 0
        gen = torch.Generator().manual_seed(0)
        got = hessian_eigen(model, x, y, CE, tol=1e-6, max_hvps=200, generator=gen, wrap=wrap, **kw)  # type: ignore[arg-type]
        assert got.matvecs == calls[0]
        return got

    cold = run()
    assert cold.symmetry is not None and cold.symmetry.matvecs == 0
    assert cold.symmetry.symmetric is True
    warm = run(warm_start=cold.warm_start)
    assert warm.symmetry is None and not warm.cold_checked
    asked = run(warm_start=cold.warm_start, symmetry_check=True)
    assert asked.symmetry is not None and asked.symmetry.matvecs == 2
    assert asked.matvecs == warm.matvecs + 2 and asked.symmetry.symmetric is True
    checked = run(warm_start=cold.warm_start, check_below=math.inf, symmetry_check=True)
    assert checked.cold_checked and checked.symmetry is not None
    assert checked.symmetry.matvecs == 0
    power = run(method="power", symmetry_check=True)
    assert power.symmetry is not None and power.symmetry.matvecs == 2


def test_a_cold_lanczos_start_checks_its_whole_start_block() -> None:
    """Three random start vectors: the largest defect of their three pairs."""
    a = _operator(50, 0.1, torch.float64)
    seen: list[tuple[Tensor, Tensor]] = []

    def matvec(v: Tensor) -> Tensor:
        seen.append((v.clone(), a @ v))
        return a @ v

    got = lanczos(matvec, 50, generator=torch.Generator().manual_seed(0), max_matvecs=10)
    assert got.symmetry is not None and got.symmetry.matvecs == 0
    pairs = [symmetry_defect(*seen[i], *seen[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert got.symmetry.defect == pytest.approx(max(pairs), rel=1e-12)
    assert got.symmetry.symmetric is False
