"""The monitor store: series with bounded memory, runs, statuses."""

from __future__ import annotations

import numpy as np

from stiffmon import protocol as p
from stiffmon.store import Series, Store


def test_series_decimation_keeps_min_and_max() -> None:
    s = Series(max_points=1000)
    rng = np.random.default_rng(0)
    values = rng.normal(size=10_000)
    values[1234] = 50.0
    values[8765] = -40.0
    for i, v in enumerate(values):
        s.append(i, float(i), float(v))
    assert len(s) <= 1000
    assert s.values.max() == 50.0 and s.values.min() == -40.0
    assert np.all(np.diff(s.steps) > 0)
    assert s.steps[0] == 0 and s.steps[-1] >= 9_990


def test_store_runs_and_status() -> None:
    st = Store()
    st.apply(
        p.Hello(run="r", seq=0, step=0, t=10.0, name="sgd", optimizer={"lr": 0.1}, batch_size=32),
        now=0.0,
    )
    st.apply(
        p.Scalars.from_dict({"loss": 2.0, "lr/0": 0.1}, run="r", seq=1, step=0, t=10.0), now=0.5
    )
    st.apply(
        p.Scalars.from_dict(
            {"sharpness/lambda1_h": 25.0, "sharpness/threshold": 20.0},
            run="r",
            seq=2,
            step=0,
            t=10.0,
        ),
        now=0.5,
    )
    rd = st.runs["r"]
    assert rd.name == "sgd" and rd.lr == 0.1 and rd.batch_size == 32
    assert rd.status(now=1.0) == "live" and rd.status(now=4.0) == "stalled"
    assert rd.break_even().step == 0
    st.apply(p.Bye(run="r", seq=3, step=0, t=11.0, reason="closed"), now=5.0)
    assert rd.status(now=100.0) == "finished"
    st.apply(p.Hello(run="q", seq=0, step=0, t=0.0), replay=True)
    assert st.runs["q"].status() == "replay" and st.runs["q"].index == 1
