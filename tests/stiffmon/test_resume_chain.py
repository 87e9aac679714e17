"""A run resumed from a checkpoint beside the run it continues (:mod:`stiffmon.resume_chain`).

Run ``a`` crashed after step 22, its last checkpoint at step 15; run ``b`` was restarted from it
with ``Agent(start_step=15)``, so steps 15–22 were recorded twice. Before: ``b``'s break-even was
judged on its own measurements from step 15 alone: the early-phase peak at step 9 (in ``a``'s
recording) was not there, and a later bump of λ1 was taken for the "early-phase peak"
(``◇ 30ᵖ`` instead of ``◆ 9ᵖ``); nothing in its log said it was resumed.
"""

from __future__ import annotations

import numpy as np
import pytest

from stiffmon import protocol as p
from stiffmon.store import Store

PEAK_A = np.r_[np.linspace(0.3, 0.6, 10), np.linspace(0.58, 0.45, 13)]  # steps 0–22
BUMP_B = np.r_[np.full(10, 0.45), np.linspace(0.5, 0.7, 6), np.linspace(0.66, 0.45, 9)]  # 15–39


def _run(run: str, name: str, first: int, lam: np.ndarray, lr: float, t0: float) -> list[p.Message]:
    steps = np.arange(first, first + lam.size, dtype=np.int64)
    times = t0 + (steps - first).astype(np.float64)
    loss = 2.0 - 0.01 * steps if lr == 0.1 else 3.0 - 0.01 * steps  # tells the runs apart
    out: list[p.Message] = [
        p.Hello(run=run, seq=0, step=first, t=t0 - 1, name=name, optimizer={"lr": lr})
    ]
    out.append(
        p.Columns(
            run=run, seq=1, step=int(steps[-1]), t=float(times[-1]), names=("loss", "lr/0"),
            steps=steps, times=times, values=(loss, np.full(steps.size, lr)),
        )
    )  # fmt: skip
    for i, (s, t, v) in enumerate(zip(steps, times, lam, strict=True)):
        out.append(
            p.Scalars(
                run=run, seq=2 + i, step=int(s), t=float(t) + 0.5,
                names=("sharpness/lambda1_h", "sharpness/threshold"),
                values=np.array([v, 3.8 / lr]),
            )
        )  # fmt: skip
    return out


def _store(*runs: list[p.Message]) -> Store:
    store = Store()
    for msgs in runs:
        store.extend(msgs, replay=True)
    return store


A = _run("a", "exp", 0, PEAK_A, 0.1, 1000.0)
B = _run("b", "exp", 15, BUMP_B, 0.1, 2000.0)


@pytest.mark.parametrize("order", ["a first", "b first"])
def test_resumed_run_is_judged_across_the_seam(order: str) -> None:
    store = _store(A, B) if order == "a first" else _store(B, A)
    a, b = store.runs["a"], store.runs["b"]
    be_a, be_b = a.break_even(), b.break_even()
    assert (be_a.step, be_a.reason, be_a.status) == (9, "early-peak", "confirmed")
    assert be_b == be_a  # the break-even of the training the resumed run continues
    assert b.aligned("sharpness/threshold", np.array([9]))[0] == pytest.approx(38.0)
    (note,) = [e for e in b.events if e.code == "resumed" and "continues" in e.attrs]
    assert note.step == 15 and note.attrs["continues"] == "a"
    assert "steps 15–22 were recorded by both" in note.message
    assert not [e for e in a.events if e.code == "resumed"]


def test_each_run_keeps_its_own_values_at_the_overlap() -> None:
    b2 = _run("b", "exp (resumed at step 15)", 15, BUMP_B, 0.05, 2000.0)  # a new lr
    store = _store(A, b2)
    a, b = store.runs["a"], store.runs["b"]
    assert b.continues is a  # the integrations' suffix names the same run
    np.testing.assert_array_equal(a.scalars["loss"].steps, np.arange(0, 23))
    np.testing.assert_array_equal(b.scalars["loss"].steps, np.arange(15, 40))
    np.testing.assert_allclose(a.scalars["loss"].values, 2.0 - 0.01 * np.arange(0, 23))
    np.testing.assert_allclose(b.scalars["loss"].values, 3.0 - 0.01 * np.arange(15, 40))
    np.testing.assert_allclose(a.scalars["sharpness/lambda1_h"].values, PEAK_A)
    np.testing.assert_allclose(b.scalars["sharpness/lambda1_h"].values, BUMP_B)
    assert b.aligned("sharpness/threshold", np.array([9, 15]))[0] == pytest.approx(38.0)
    assert b.aligned("sharpness/threshold", np.array([9, 15]))[1] == pytest.approx(76.0)


def test_resumed_run_alone_has_no_early_peak_and_says_why() -> None:
    store = _store(B)
    b = store.runs["b"]
    assert b.continues is None
    assert b.break_even().step is None  # not the later bump at step ~30
    (note,) = [e for e in b.events if e.code == "resumed"]
    assert note.step == 15 and "without the early-phase-peak rule" in note.message


def test_a_later_run_of_another_name_or_start_is_not_linked() -> None:
    other = _run("c", "other", 15, BUMP_B, 0.1, 2000.0)
    earlier = _run("d", "exp", 15, BUMP_B, 0.1, 500.0)  # started before a: not its resumption
    store = _store(A, other, earlier)
    assert store.runs["c"].continues is None and store.runs["d"].continues is None


def test_a_late_joiner_whose_history_reaches_step_0_is_no_resumed_run() -> None:
    """Live, the first steps seen may be late ones (the history comes after): the run waits to
    be linked until its history shows it starts at 0, then is checked no more."""
    late = _run("c", "exp", 0, PEAK_A, 0.1, 3000.0)
    store = Store()
    hello, history = late[0], late[1:]
    store.extend([hello, *history[-5:]])  # live rows first (steps 18–22)
    assert store.unlinked == {"c"}
    store.extend(history[:-5])  # then the history from step 0
    assert store.unlinked == set() and store.runs["c"].continues is None
    assert not [e for e in store.runs["c"].events if e.code == "resumed"]
