"""The break-even line under the sharpness chart names a catapult once."""

from __future__ import annotations

from stiffmon import protocol as p
from stiffmon.store import Store
from stiffmon.tui.views.sharpness import be_words


def test_catapult_marker_is_not_repeated_as_an_extra_catapult() -> None:
    store = Store()
    lam = [1.0, 2.0, 4.0, 16.0, 5.0, 5.5, 5.2, 5.4, 5.1, 5.3]
    for i, v in enumerate(lam):
        store.apply(
            p.Scalars.from_dict(
                {"sharpness/lambda1_h": v, "sharpness/threshold": 10.0},
                run="r",
                seq=i,
                step=20 * i,
                t=float(i),
            ),
            replay=True,
        )
    rd = store.runs["r"]
    be = rd.break_even()
    assert be.reason == "catapult" and be.step == 60 and be.catapults == (60,)
    words = be_words(rd)
    assert words.startswith("break-even 60 (") and "catapult" in words
    assert "catapult at" not in words  # the marker already says it


def test_no_break_even_yet_while_running_and_none_once_finished() -> None:
    store = Store()
    for i in range(6):  # still rising
        store.apply(
            p.Scalars.from_dict(
                {"sharpness/lambda1_h": 1.0 + i, "sharpness/threshold": 100.0},
                run="r",
                seq=i,
                step=10 * i,
                t=float(i),
            ),
            replay=True,
        )
    rd = store.runs["r"]
    assert be_words(rd) == "no break-even yet"
    store.apply(p.Bye(run="r", seq=6, step=50, t=6.0, reason="closed"), replay=True)
    assert be_words(rd) == "no break-even"
