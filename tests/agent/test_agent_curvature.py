"""The agent publishes the Hessian trace / density on its schedule and the gradient tests."""

from __future__ import annotations

import math
from pathlib import Path

from torch import nn

from stiffmon import protocol as p
from stiffmon.session import read_session
from stiffmon_agent import Agent
from tests.agent.test_agent import tiny, train


def test_density_schedule_and_gradient_tests(tmp_path: Path) -> None:
    model, opt, x, y = tiny()
    rec = tmp_path / "r.stiff"
    with Agent(
        model,
        nn.CrossEntropyLoss(),
        opt,
        probe=(x[:12], y[:12]),
        endpoint="",
        record=rec,
        gram_every=4,
        sharpness_every="never",
        density_every=5,
        density_runs=2,
        density_steps=6,
        trace_samples=3,
        batch_test_theta=(0.5, 0.9, 5.84),
        overhead_cap=1.0,
        batch_size=16,
    ) as agent:
        train(agent, model, opt, x, y, 11)
    assert agent.disabled == {}
    msgs, _ = read_session(rec)
    dens = [m for m in msgs if isinstance(m, p.Curve) and m.name == "hessian-density"]
    assert [m.step for m in dens] == [0, 5, 10]
    assert all(m.attrs["hvps"] == 2 * 6 + 3 and m.attrs["grid"] == "linear" for m in dens)
    trace = [m for m in msgs if isinstance(m, p.Scalars) and "curvature/trace" in m.names]
    assert [m.step for m in trace] == [0, 5, 10]
    assert all(math.isfinite(m.as_dict()["curvature/trace_stderr"]) for m in trace)
    gram = [m for m in msgs if isinstance(m, p.Scalars) and "noise/norm_test" in m.names]
    assert [m.step for m in gram] == [0, 4, 8]
    v = gram[0].as_dict()
    assert v["noise/theta/norm_test"] == 0.5
    b = 12  # the train probe is the batch of the tests
    want = b * v["noise/norm_test"] ** 2 / 0.25
    assert math.isclose(v["noise/suggested_batch/norm_test"], want, rel_tol=1e-9)
    cov = [
        m.as_dict() for m in msgs if isinstance(m, p.Scalars) and "coverage/density/done" in m.names
    ]
    assert [c["coverage/density/done"] for c in cov] == [1.0, 2.0, 3.0]
