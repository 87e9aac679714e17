"""The overhead budget: what it counts and the bound it keeps (the whole-run slowdown)."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from torch import nn

from stiffmon_agent import Agent
from stiffmon_agent.budget import STREAM_WEIGHT, MeasurementBudget
from tests.agent.test_step_path import probe_agent


def _budget(cap: float | None, publishing: list[float]) -> MeasurementBudget:
    events: list[Any] = []
    return MeasurementBudget(cap, lambda: publishing[0], lambda *a, **k: events.append(a))


def test_the_allowance_is_the_slowdown_bound_not_a_share_of_wall_time() -> None:
    """With cost C after wall time T the training's own time is T − C, and C ≤ c (T − C) is
    C ≤ c / (1 + c) T: 5 % of a 10.5 s run is 0.525 s, but a 1.05 × slowdown allows 0.5 s."""
    b = _budget(0.05, [0.0])
    b.start = time.perf_counter() - 10.5
    assert b.allowance() == pytest.approx(0.5, rel=1e-3)
    assert _budget(None, [0.0]).allowance() == float("inf")


@pytest.mark.parametrize("part", ["measure", "step", "publisher"])
def test_every_cost_counts_against_the_cap(part: str) -> None:
    publishing = [0.0]
    b = _budget(0.05, publishing)
    b.start = time.perf_counter() - 21.0  # allowance 1.0 s
    b.last_cost["gram"] = 0.3
    assert b.within("gram", 5)
    if part == "measure":
        b.record_cost("sharpness", 0.75)
    elif part == "step":
        b.step_seconds = 0.75 / STREAM_WEIGHT
    else:
        publishing[0] = 0.75 / STREAM_WEIGHT
    assert b.spent() == pytest.approx(0.75)
    assert not b.within("gram", 5)  # 0.75 + 0.3 > 1.0
    assert b.within("gram", 0)  # the step-0 measurement always runs


def test_the_stream_is_charged_at_its_weight_and_measurements_at_their_time() -> None:
    """0.1 s of ``step()`` and 0.05 s of publisher CPU cost the run 2 × 0.15 s; a 0.2 s
    measurement 0.2 s."""
    publishing = [0.05]
    b = _budget(0.05, publishing)
    b.step_seconds = 0.1
    b.record_cost("gram", 0.2)
    assert STREAM_WEIGHT == 2.0
    assert b.spent() == pytest.approx(0.2 + 2.0 * 0.15)
    b.start = time.perf_counter() - 14.7  # allowance 0.7 s: spent 0.5 + gram 0.2 fits
    assert b.within("gram", 7)
    b.step_seconds = 0.11  # 0.02 s more charged: no longer
    assert not b.within("gram", 7)


def test_agent_charges_its_step_time_to_the_budget() -> None:
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = Agent(model, nn.CrossEntropyLoss(), opt, endpoint="", registry=False)
    before = agent._budget.step_seconds
    t0 = time.perf_counter()
    for _ in range(200):
        agent.step(torch.tensor(0.5), torch.randn(8, 3), torch.randint(0, 3, (8,)))
    wall = time.perf_counter() - t0
    agent.close()
    assert 0.0 < agent._budget.step_seconds - before <= wall


def test_only_the_step0_gram_runs_regardless_of_the_budget() -> None:
    """A cold-start sharpness costs ~10 Grams: at step 0 (allowance ~0) it waits for the budget."""
    b = _budget(0.02, [0.0])
    assert b.within("gram", 0)
    b.record_cost("gram", 0.02)  # the Gram is first at a step
    assert not b.within("sharpness", 0) and not b.within("density", 0)
    assert _budget(None, [0.0]).within("sharpness", 0)  # no cap: everything runs


def test_a_kind_never_measured_is_predicted_at_the_costliest_so_far() -> None:
    """Not at 0 s: the first density (72 HVPs) used to run on any headroom at all."""
    b = _budget(0.05, [0.0])
    assert b.predicted_cost("density") == 0.0  # nothing known yet
    b.record_cost("gram", 0.05)
    b.record_cost("sharpness", 0.25)
    assert b.predicted_cost("density") == 0.25
    assert b.predicted_cost("gram") == 0.05  # a kind measured before: its own last cost
    b.start = time.perf_counter() - 8.0  # allowance 0.381 s, spent 0.30 s
    assert b.within("gram", 9) and not b.within("density", 9)


def test_a_first_density_is_priced_at_its_products_once_one_product_has_a_price() -> None:
    """On the benchmark's CNN the first density (72 HVPs, 0.45 s) was priced at the last warm
    sharpness (0.14 s) and overshot a 5 % cap's 10,000-step run by ~1 %."""
    b = _budget(0.05, [0.0])
    b.record_cost("gram", 0.05)
    b.record_cost("sharpness", 0.14, hvps=20)  # 7 ms per product
    assert b.hvp_seconds == pytest.approx(0.007)
    assert b.predicted_cost("density", 72) == pytest.approx(0.504)
    assert b.predicted_cost("density") == 0.14  # products unknown: the costliest so far
    assert b.predicted_cost("sharpness", 72) == 0.14  # measured before: its own last cost
    b.start = time.perf_counter() - 12.0  # allowance 0.571 s, spent 0.19 s
    assert b.within("density", 9) and not b.within("density", 9, 72)
    b.record_cost("gram", 0.05)  # a Gram uses no products: the price stays
    assert b.hvp_seconds == pytest.approx(0.007)


def test_the_agent_prices_products_from_its_sharpness_and_asks_with_the_density_plan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    agent = probe_agent(gram_every="never", sharpness_every=1)
    runner = agent._runner
    assert runner is not None
    agent.step(0.5)  # the step-0 sharpness may wait for the budget at the default cap
    before = runner.budget.coverage["sharpness"][0]  # (0 or 1: timing on a loaded machine)
    runner.budget.start -= 1000.0  # an allowance of 20 s
    agent.step(0.5)
    assert runner.budget.coverage["sharpness"][0] == before + 1
    used = runner.budget.hvp_seconds
    assert used is not None and 0 < used < runner.budget.last_cost["sharpness"]
    asked: list[tuple[str, int]] = []
    monkeypatch.setattr(
        runner.budget, "within", lambda kind, step, hvps=0: asked.append((kind, hvps)) or False
    )
    runner.measure("density", 2)
    runner.measure("sharpness", 2)
    agent.close()
    o = runner.opts
    assert asked == [("density", o.density_runs * o.density_steps + o.trace_samples)]
    assert asked[0][1] > 0


def test_the_longest_waiting_kind_goes_first_and_cheaper_ones_do_not_overtake_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: at every due step the Gram (20 ms) went first and spent the headroom, so the
    sharpness (240 ms) never ran after step 0. Now the kind that waited longest goes first, and
    if it does not fit, the rest of its step waits with it."""
    agent = probe_agent(gram_every=2, sharpness_every=2)
    runner = agent._runner
    assert runner is not None
    asked: list[tuple[int, str]] = []
    fits = {0: {"gram"}, 2: {"gram"}, 4: {"gram", "sharpness"}, 6: {"gram", "sharpness"}}

    def within(kind: str, step: int, hvps: int = 0) -> bool:
        asked.append((step, kind))
        return kind in fits[step]

    monkeypatch.setattr(runner.budget, "within", within)
    monkeypatch.setattr(runner, "_run", lambda kind, step: None)
    for _ in range(7):
        agent.step(0.5)
    agent.close()
    # step 0: both new, gram first; the sharpness does not fit. Step 2: the sharpness has waited
    # longer, does not fit, and the gram is not asked: it would overtake it.
    assert asked == [
        (0, "gram"),
        (0, "sharpness"),
        (2, "sharpness"),
        (4, "sharpness"),
        (4, "gram"),
        (6, "gram"),  # both ran at 4: the order of the due list again
        (6, "sharpness"),
    ]
    skipped = {k: v[1] for k, v in agent._budget.coverage.items()}
    assert skipped == {"gram": 1, "sharpness": 2, "density": 0}
    assert agent._plan.last_run == {"gram": 6, "sharpness": 6}


def test_a_cap_skip_says_what_the_stream_and_the_measurements_cost() -> None:
    """On a fast CPU loop the stream alone can fill the cap: the skip event says so in numbers
    (each a fraction of the training's own time, the elapsed time less what the agent cost)."""
    events: list[tuple[Any, ...]] = []
    b = MeasurementBudget(0.02, lambda: 0.1, lambda *a, **k: events.append((a, k)))
    b.step_seconds = 0.15  # stream 0.25 s, charged 0.5 s
    b.record_cost("gram", 0.5)
    b.start = time.perf_counter() - 10.0  # training's own time ~9.0 s
    stream, measure = b.shares()
    assert stream == pytest.approx(0.5 / 9.0, rel=1e-3)
    assert measure == pytest.approx(0.5 / 9.0, rel=1e-3)
    b.skip("sharpness", "overhead-cap")
    (code, msg), attrs = events[0]
    assert code == "measurement-skipped"
    assert "per-step stream costs 5.6% and the measurements 5.6%" in msg
    assert attrs["stream_share"] == pytest.approx(stream, rel=1e-3)
    assert attrs["reason"] == "overhead-cap" and attrs["kind"] == "sharpness"
