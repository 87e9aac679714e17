"""A class stiffness map too big for the screen (100 classes) shows the part around the cursor,
says which part, and keeps the colour bar, the cursor's value and the keys on screen."""

from __future__ import annotations

import numpy as np
import pytest

from stiffmon import protocol as p
from stiffmon.store import Store
from stiffmon.tui.app import StiffmonApp
from stiffmon.tui.views.stiffness import window
from tests.stiffmon.tui.test_app import feed, screen_text

N = 100


def _matrix(run: str) -> p.Matrix:
    data = np.fromfunction(lambda r, c: (r - c) / 200.0, (N, N))  # cell (r, c) = (r − c)/200
    labels = tuple(f"c{i}" for i in range(N))
    return p.Matrix(
        run=run,
        seq=500,
        step=10,
        t=110.0,
        name="stiffness/cos/train-train",
        data=data,
        row_labels=labels,
        col_labels=labels,
        attrs={"within": 0.5, "between": 0.0},
    )


@pytest.mark.parametrize("size", [(120, 40), (80, 24)])
async def test_every_cell_of_a_100_class_map_can_be_reached_and_read(
    size: tuple[int, int],
) -> None:
    store = Store()
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=size) as pilot:
        feed(store, "a", range(11), now=0.0)
        store.apply(_matrix("a"), now=0.0)
        await pilot.press("2")
        await pilot.pause(0.3)
        text = screen_text(app)
        assert (
            "rows 0–" in text and "cols 0–" in text and "of 100 × 100" in text
        )  # which part is shown
        assert "-1 " in text and " +1" in text  # the colour bar
        assert "c0 → c0: +0.000" in text  # the cursor's value
        assert "b block" in text  # the keys
        for _ in range(N + 5):  # past the last row and column: held at the edge
            await pilot.press("shift+right", "shift+down")
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "c99 → c99: +0.000" in text
        assert "–99 × cols" in text and "–99 of 100 × 100" in text
        for _ in range(30):
            await pilot.press("shift+left")
        await pilot.pause(0.3)
        assert "c99 → c69: +0.150" in screen_text(app)  # (99 − 69)/200


def test_a_map_that_fits_is_shown_whole() -> None:
    labels = tuple(f"c{i}" for i in range(10))
    assert window(10, 10, (0, 0), width=95, free=30, row_labels=labels) is None
    # 100 columns of 2 characters do not fit 95 (labels ``c98·c99`` and a space: 8): 43 of them,
    # around the cursor but inside the matrix
    (r0, r1), (c0, c1) = window(100, 100, (50, 99), 95, 30, tuple(f"c{i}" for i in range(100)))
    assert (c0, c1) == (57, 100) and r0 % 2 == 0 and r0 <= 50 < r1 and r1 - r0 <= 58
