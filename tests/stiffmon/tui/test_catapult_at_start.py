"""A run whose first λ1 measurement is already above its threshold, and below it next: derive's
rule calls that a catapult at step 0; the words say that the run started above the threshold
(the numbers and the rule are unchanged)."""

from __future__ import annotations

from stiffmon import protocol as p
from stiffmon.store import Store
from stiffmon.tui.views.sharpness import be_words


def run_of(lam: list[float], threshold: float = 4.0, every: int = 25) -> Store:
    store = Store()
    for i, v in enumerate(lam):
        store.apply(
            p.Scalars.from_dict(
                {"sharpness/lambda1_h": v, "sharpness/threshold": threshold},
                run="r",
                seq=i,
                step=every * i,
                t=float(i),
            ),
            replay=True,
        )
    return store


def test_a_run_that_starts_above_the_threshold_says_so() -> None:
    rd = run_of([4.24, 2.32, 1.21, 1.99, 1.39, 1.06, 1.1, 0.9]).runs["r"]
    be = rd.break_even()
    assert (be.step, be.reason, be.status) == (0, "catapult", "confirmed")  # derive unchanged
    assert be_words(rd) == "break-even 0 (catapult: started above thr) λ1_H 4.24"


def test_a_catapult_later_in_training_is_still_just_a_catapult() -> None:
    rd = run_of([1.0, 2.0, 4.5, 2.0, 1.5, 1.4, 1.3, 1.2]).runs["r"]
    assert be_words(rd) == "break-even 50 (catapult) λ1_H 4.5"


def test_a_first_measurement_that_is_not_finite_does_not_count() -> None:
    """The first finite measurement is the run's first: a NaN before it is skipped by derive."""
    rd = run_of([float("nan"), 4.24, 2.32, 1.21, 1.99, 1.39, 1.06, 1.1]).runs["r"]
    assert be_words(rd) == "break-even 25 (catapult: started above thr) λ1_H 4.24"
