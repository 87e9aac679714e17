"""The curvature view and the gradient tests in the noise view, driven by Pilot."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.stiffmon.tui.test_app import replay_app, screen_text


@pytest.mark.parametrize("size", [(80, 24), (160, 45)])
async def test_curvature_view_scrubs_density_measurements(
    tmp_path: Path, size: tuple[int, int]
) -> None:
    app = replay_app(tmp_path)
    async with app.run_test(size=size) as pilot:
        await pilot.press("h")
        await pilot.pause()
        assert app.view_name == "curvature"
        text = screen_text(app)
        # 600 steps, a density every 100: six measurements, the latest shown
        assert "density 6/6, step 500" in text
        assert "density by step" in text and "Hessian trace" in text
        await pilot.press("left", "left")
        await pilot.pause()
        assert "density 4/6, step 300" in screen_text(app)
        await pilot.press("5")
        await pilot.pause()
        text = screen_text(app)
        assert "gradient tests" in text and "suggested batch" in text
        # the distance view shows stiffness-distance curves only, not the density
        await pilot.press("3")
        await pilot.pause()
        assert "hessian-density" not in screen_text(app)


async def test_curvature_and_noise_views_in_ascii(tmp_path: Path) -> None:
    app = replay_app(tmp_path, ascii=True)
    async with app.run_test(size=(80, 24)) as pilot:
        for key in "h5":
            await pilot.press(key)
            await pilot.pause()
            text = screen_text(app)
            bad = sorted({ch for ch in text if not ch.isascii()})
            assert not bad, (key, bad)
        assert "actual B -> suggested" in screen_text(app)
