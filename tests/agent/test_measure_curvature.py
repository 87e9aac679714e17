"""The curvature and gradient-test messages: names, wire round trip, values against references."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from stiffmon import protocol as p
from stiffmon_agent.measure import make_probe
from stiffmon_agent.measure_curvature import density_messages, gradient_test_scalars
from stiffmon_agent.outgoing import Outgoing
from tests.agent.metrics.reference import loop_gradients
from tests.agent.metrics.test_density import CE, dense_hessian, small_problem


def wire(item: Outgoing) -> p.Message:
    """Build the message as the publisher does and send it through encode/decode."""
    fields: dict[str, Any] = dict(item.fields)
    if "values_raw" in fields:
        fields["names"] = tuple(fields.pop("values_names"))
        fields["values"] = np.array([float(v) for v in fields.pop("values_raw")])
    msg = item.cls(run="r", seq=0, step=item.step, t=item.t, **fields)
    return p.decode(p.encode(msg))


def test_density_messages_round_trip_and_trace() -> None:
    model, x, y = small_problem()
    h = dense_hessian(model, x, y)
    probe = make_probe((x, y), None, None, 3, None)
    before = [q.detach().clone() for q in model.parameters()]
    msgs = [
        wire(m)
        for m in density_messages(
            model,
            CE,
            probe,
            7,
            runs=3,
            steps=20,
            trace_samples=40,
            points=64,
            generator=torch.Generator().manual_seed(0),
        )
    ]
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)  # no measurement changes a parameter
    curve, scalars = msgs
    assert isinstance(curve, p.Curve) and curve.name == "hessian-density" and curve.step == 7
    assert curve.x.shape == curve.y.shape == (64,)
    assert curve.attrs["grid"] == "linear" and curve.attrs["runs"] == 3
    assert curve.attrs["hvps"] == 3 * 20 + 40 and curve.attrs["dim"] == 51
    lam = torch.linalg.eigvalsh(h)
    assert curve.x[0] <= float(lam.min()) and curve.x[-1] >= float(lam.max())
    assert float(np.trapezoid(curve.y, curve.x)) == pytest.approx(1.0, abs=1e-3)
    assert isinstance(scalars, p.Scalars)
    v = scalars.as_dict()
    assert set(v) == {"curvature/trace", "curvature/trace_stderr", "curvature/hvps"}
    assert abs(v["curvature/trace"] - float(h.trace())) < 3 * v["curvature/trace_stderr"]
    assert curve.attrs["trace"] == pytest.approx(v["curvature/trace"])


def test_gradient_test_scalars() -> None:
    model, x, y = small_problem()
    g = loop_gradients(model, x, y, CE)
    got = gradient_test_scalars(g @ g.T, theta_norm=0.5)
    assert set(got) == {
        f"noise/{kind}{t}"
        for kind in ("", "suggested_batch/", "theta/")
        for t in ("norm_test", "inner_product_test", "orthogonality_test")
    }
    b = g.shape[0]
    # the suggested batch is B θ_max² / θ²
    assert got["noise/suggested_batch/norm_test"] == pytest.approx(
        b * got["noise/norm_test"] ** 2 / 0.25, rel=1e-9
    )
    assert got["noise/theta/norm_test"] == 0.5
    assert got["noise/theta/orthogonality_test"] == pytest.approx(5.84)
    assert all(math.isfinite(val) for val in got.values())


def test_density_of_a_sum_objective_scales_with_b() -> None:
    """scale = B (a sum-reduced loss): the same probe vectors give B × the trace and Ritz values."""
    model, x, y = small_problem()
    probe = make_probe((x, y), None, None, 3, None)

    def run(scale: float) -> p.Curve:
        msgs = density_messages(
            model,
            CE,
            probe,
            0,
            runs=1,
            steps=5,
            trace_samples=2,
            scale=scale,
            generator=torch.Generator().manual_seed(3),
        )
        curve = wire(msgs[0])
        assert isinstance(curve, p.Curve)
        return curve

    one, three = run(1.0), run(3.0)
    assert three.attrs["trace"] == pytest.approx(3 * one.attrs["trace"], rel=1e-9)
    assert three.attrs["ritz_max"] == pytest.approx(3 * one.attrs["ritz_max"], rel=1e-9)
