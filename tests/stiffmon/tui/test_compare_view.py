"""The live compare table (view 6) follows a schedule: η and β of the last step, not the ones
in force at the last heavy measurement (its row is otherwise redone only when one arrives)."""

from __future__ import annotations

import html
import re

import pytest

from stiffmon.store import Store
from stiffmon.tui.app import StiffmonApp
from tests.stiffmon.tui.test_app import feed, screen_text


async def test_compare_table_shows_the_last_steps_lr_and_momentum() -> None:
    store = Store()
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(160, 40)) as pilot:
        feed(store, "a", [0], now=0.0, **{"sharpness/lambda1_h": 3.0, "lr/0": 0.0123})
        feed(store, "a", range(1, 10), now=0.0, **{"lr/0": 0.0123, "momentum/0": 0.93})
        await pilot.press("6")
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "0.0123" in text and "0.93" in text
        feed(store, "a", range(10, 20), now=0.0, **{"lr/0": 0.0456, "momentum/0": 0.77})
        await pilot.pause(0.3)  # no new measurement: only per-step columns moved
        text = screen_text(app)
        assert "0.0456" in text and "0.77" in text
        assert "0.0123" not in text and "0.93" not in text


def screen_rows(app: StiffmonApp) -> list[str]:
    """The screen's lines (the SVG's text elements grouped by their y)."""
    svg = app.export_screenshot()
    rows: dict[float, list[str]] = {}
    for y, t in re.findall(r'<text[^>]*y="([0-9.]+)"[^>]*>(.*?)</text>', svg):
        rows.setdefault(float(y), []).append(html.unescape(t).replace("\xa0", " "))
    return ["".join(parts) for _, parts in sorted(rows.items())]


@pytest.mark.parametrize("size", [(160, 40), (80, 24)], ids=["rows", "columns"])
async def test_each_row_says_which_sharpness_and_threshold_it_shows(
    size: tuple[int, int],
) -> None:
    """An SGD run is judged on λ1_H against 2/η, an Adam run on λ1(P⁻¹H) against 38/η; the
    table names the kind per run, and the thr and λ1@BE cells are that kind's."""
    store = Store()
    for s in range(0, 200, 10):
        lam = min(30.0, 1.0 + s * 0.3)
        sgd = {"sharpness/lambda1_h": lam, "sharpness/threshold": 20.0, "lr/0": 0.1}
        feed(store, "sgd", [s], now=0.0, **sgd)
        adam = {
            "sharpness/lambda1_h": 100.0 + s,
            "sharpness/threshold": 22.0,  # not the one the run is judged on
            "sharpness/lambda1_precond": 2 * lam,
            "sharpness/threshold_precond": 38.0,
            "lr/0": 1e-3,
        }
        feed(store, "adam", [s], now=0.0, **adam)
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=size) as pilot:
        await pilot.press("6")
        await pilot.pause(0.3)
        rows = screen_rows(app)
    if size[0] >= 118:  # one row per run: kind, thr, BE, λ1@BE in that order
        sgd_row = next(r for r in rows if "live sgd" in r and "thr" in r)
        adam_row = next(r for r in rows if "live adam" in r and "thr" in r)
        assert re.search(r"\bH\s*20\b.*60 thr\s*19\b", sgd_row), sgd_row
        assert "P⁻¹H" not in sgd_row
        assert re.search(r"P⁻¹H\s*38\b.*60 thr\s*38\b", adam_row), adam_row
        assert "22" not in adam_row.split("P⁻¹H", 1)[1].split("thr", 1)[0]
    else:  # one column per run: the λ1 row names the kinds, thr the matching thresholds
        kinds = next(r for r in rows if re.search(r"│λ1\s", r))
        thr = next(r for r in rows if re.search(r"│thr\s", r))
        assert re.search(r"\bH\s+P⁻¹H", kinds), kinds
        assert re.search(r"\b20\s+38\b", thr), thr
    text = "\n".join(rows)
    assert "P⁻¹H λ1(P⁻¹H)" in text or size[0] < 118  # the legend says what the kinds are
