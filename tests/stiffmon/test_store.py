"""The monitor store: series with bounded memory, runs, statuses."""

from __future__ import annotations

import numpy as np

from stiffmon import protocol as p
from stiffmon.store import MAX_EVENTS, Health, Series, Store


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


def _ev(code: str, step: int, message: str = "", **attrs: object) -> p.Event:
    return p.Event(
        run="r",
        seq=step,
        step=step,
        t=10.0 + step,
        code=code,
        message=message,
        level="warning",
        attrs=attrs,
    )  # type: ignore[arg-type]


def test_health_in_words() -> None:
    st = Store()
    st.apply(p.Hello(run="r", seq=0, step=0, t=10.0, name="sgd"), now=0.0)
    rd = st.runs["r"]
    assert rd.health(now=1.0) == Health("live", "live")
    h = rd.health(now=15.0)
    assert (h.state, h.text, h.level) == ("stalled", "stalled 15s", "warning")
    h = rd.health(now=200.0)
    assert (h.state, h.text, h.level) == ("lost", "no bye (lost 3m)", "error")
    st.apply(p.Scalars.from_dict({"loss": float("nan")}, run="r", seq=1, step=19, t=11.0), now=0.0)
    st.apply(_ev("metric-error", 20, "gram failed: RuntimeError: boom", metric="gram"), now=0.0)
    st.apply(_ev("metric-disabled", 20, "gram disabled for the rest", metric="gram"), now=0.0)
    st.apply(p.Bye(run="r", seq=9, step=30, t=12.0, reason="closed"), now=0.0)
    h = rd.health(now=500.0)
    assert h.state == "finished" and h.level == "error"
    assert h.problems == ("diverged at step 19", "gram disabled: gram failed: RuntimeError: boom")
    st.apply(p.Hello(run="q", seq=0, step=0, t=0.0), replay=True)
    q = st.runs["q"]
    assert q.health().text == "replay" and q.health(ended=True).text == "no bye (crashed?)"


def test_nan_loss_event_marks_divergence_at_its_step() -> None:
    st = Store()
    st.apply(_ev("nan-loss", 42, "loss is nan at step 42"), now=0.0)
    assert st.runs["r"].diverged_step == 42 and len(st.runs["r"].events) == 1


def test_coverage_from_counters_and_from_events() -> None:
    st = Store()
    for step, (done, skipped) in enumerate([(1, 0), (1, 1), (2, 1), (2, 2)]):
        st.apply(
            p.Scalars.from_dict(
                {"coverage/gram/done": done, "coverage/gram/skipped": skipped},
                run="r",
                seq=step,
                step=step * 10,
                t=float(step),
            ),
            now=0.0,
        )
    rd = st.runs["r"]
    assert rd.coverage("gram") == (2, 2) and rd.skipped_at("gram") == [10, 30]
    for s in (5, 15):
        st.apply(_ev("measurement-skipped", s, "", kind="sharpness", reason="overhead"), now=0.0)
    assert rd.coverage("sharpness") == (0, 2)
    assert rd.skip_reasons["sharpness"] == {"overhead": 2} and rd.skipped_at("sharpness") == [5, 15]
    st.apply(_ev("measurement-skipped", 90, "", kind="sharpness", reason="overhead", skipped=10))
    assert rd.skip_reasons["sharpness"] == {"overhead": 10}  # the agent's count: events thin out


def test_events_are_bounded() -> None:
    st = Store()
    for i in range(MAX_EVENTS + 10):
        st.apply(_ev("schedule-stretched", i), now=0.0)
    rd = st.runs["r"]
    assert len(rd.events) <= MAX_EVENTS and rd.events_dropped + len(rd.events) == MAX_EVENTS + 10


def test_memo_recomputes_only_when_the_series_changes() -> None:
    st = Store()
    st.apply(p.Scalars.from_dict({"sharpness/lambda1_h": 1.0}, run="r", seq=0, step=0, t=0.0))
    rd = st.runs["r"]
    calls = []

    def compute() -> int:
        calls.append(1)
        return len(calls)

    key = rd.data_key("sharpness/lambda1_h")
    assert rd.memoized("x", key, compute) == 1 and rd.memoized("x", key, compute) == 1
    st.apply(p.Scalars.from_dict({"loss": 1.0}, run="r", seq=1, step=1, t=0.0))
    assert rd.data_key("sharpness/lambda1_h") == key  # another series: same key
    st.apply(p.Scalars.from_dict({"sharpness/lambda1_h": 2.0}, run="r", seq=2, step=2, t=0.0))
    assert rd.memoized("x", rd.data_key("sharpness/lambda1_h"), compute) == 2
