"""The class-stiffness map of 1000 classes (ImageNet) in the monitor: the screen says which part
of the 1000 × 1000 map it shows, and the value under the cursor is the recorded cell's."""

from __future__ import annotations

import numpy as np

from stiffmon import protocol as p
from stiffmon.store import Store
from stiffmon.tui.app import StiffmonApp
from tests.stiffmon.tui.test_app import feed, screen_text

K = 1000


async def test_a_1000_class_map_reads_out_the_recorded_cells() -> None:
    rng = np.random.default_rng(1)
    data = np.round(rng.uniform(-1, 1, (K, K)), 3)
    data[rng.uniform(size=(K, K)) < 0.8] = np.nan  # classes without probe examples
    names = tuple(f"n{i:08d}" for i in range(K))
    store = Store()
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(120, 40)) as pilot:
        feed(store, "a", range(11), now=0.0)
        store.apply(
            p.Matrix(run="a", seq=500, step=10, t=110.0, name="stiffness/cos/train-train",
                     data=data, row_labels=names, col_labels=names,
                     attrs={"within": 0.5, "between": 0.0}),
            now=0.0,
        )  # fmt: skip
        await pilot.press("2")
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "of 1000 × 1000" in text
        for _ in range(120):
            await pilot.press("shift+down")
        for _ in range(75):
            await pilot.press("shift+right")
        await pilot.pause(0.3)
        text = screen_text(app)
        v = data[120, 75]  # this seed: NaN, a pair of classes without examples
        want = "n/a (no pairs)" if np.isnan(v) else f"{v:+.3f}"
        assert f"{names[120]} → {names[75]}: {want}" in text
        c = next(j for j in range(76, K) if np.isfinite(data[120, j]))  # a measured pair
        for _ in range(c - 75):
            await pilot.press("shift+right")
        await pilot.pause(0.3)
        assert f"{names[120]} → {names[c]}: {data[120, c]:+.3f}" in screen_text(app)
