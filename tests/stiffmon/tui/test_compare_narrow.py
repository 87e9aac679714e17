"""The compare table on a narrow or short screen: every number whole; the runs (columns) and
fields (rows) that do not fit are left out and named in a note, never cut to ``0.00…``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from stiffmon.summary import fmt
from stiffmon.tui.app import StiffmonApp
from stiffmon.tui.renderables.comparetable import FIELDS, compare_table
from stiffmon.tui.sources import ReplaySource
from tests.stiffmon.tui.fixtures import write_sessions
from tests.stiffmon.tui.test_app import screen_text


def render(renderable: object, width: int) -> str:
    console = Console(width=width, color_system=None, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(renderable)
    return console.export_text()


def six_runs() -> list[tuple[str, str, dict[str, Any]]]:
    """Six runs like a recorded sweep: long numbers (η/B 0.00078, loss 0.000203, a break-even
    ``◆ 1,250 thr``) that a column of 5 characters would cut."""
    runs = []
    for i, lr in enumerate((0.05, 0.5, 0.005, 0.1, 0.2, 0.02)):
        runs.append(
            (
                f"sgd lr={lr}",
                "red",
                {
                    "lr": lr,
                    "batch_size": 64,
                    "momentum": 0.0,
                    "lr_over_batch": lr / 64,
                    "break_even_step": 1250 if i % 2 else None,
                    "break_even_reason": "threshold",
                    "break_even_status": "confirmed" if i % 2 else "none",
                    "peak_lambda1_h": 3.83 + i,
                    "final_loss": 0.000203 * (i + 1),
                },
            )
        )
    return runs


@pytest.mark.parametrize(("width", "max_rows"), [(40, 13), (54, 16), (80, 30)])
def test_narrow_table_cuts_no_value_and_names_what_it_leaves_out(width: int, max_rows: int) -> None:
    runs = six_runs()
    out = render(compare_table(runs, width, max_rows=max_rows), width)
    lines = out.rstrip("\n").splitlines()
    assert len(lines) <= max_rows and all(len(ln) <= width for ln in lines)
    rows = {ln.split()[0]: ln for ln in lines[1:] if ln.split() and ln.split()[0] in ("η", "η/B")}
    shown = len(rows["η"].split()) - 1
    assert "…" not in rows["η/B"] and "…" not in rows["η"]
    assert rows["η/B"].split()[1:] == [fmt(s["lr_over_batch"], ".2g") for _, _, s in runs][:shown]
    assert all("…" not in ln for ln in lines[1 : 1 + len(FIELDS)] if ln.startswith(" "))
    text = " ".join(out.split())
    if shown < len(runs):
        left = ", ".join(n for n, _, _ in runs[shown:])
        assert f"not shown (no room): runs {left}" in text
    for head, _ in FIELDS:  # a field is a row, or named as left out
        assert any(ln.split()[:1] == [head] or ln.startswith(f"{head} ") for ln in lines) or (
            f" {head}" in text.split("rows", 1)[-1]
        ), head


def test_wide_enough_shows_everything_without_a_note() -> None:
    runs = six_runs()[:3]
    out = render(compare_table(runs, 100, max_rows=20), 100)
    assert "not shown" not in out and "◆ 1,250 thr" in out and "0.00078" in out


@pytest.mark.parametrize("size", [(60, 20), (80, 24)])
async def test_six_runs_on_a_small_screen(tmp_path: Path, size: tuple[int, int]) -> None:
    src = ReplaySource(write_sessions(tmp_path, lrs=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5)))
    src.load()
    app = StiffmonApp(replay=src, clock=lambda: 0.0, screenshot_dir=tmp_path)
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        await pilot.press("6")
        await pilot.pause()
        text = screen_text(app)
        assert "not shown (no room): runs" in text and "sgd lr=0.5" in text.split("runs", 1)[1]
        assert "0.00016" in text  # η/B of lr 0.01 at B 64, whole
        assert not any(cut in text for cut in ("0.0…", "0.00…", "none…", "◆ 3…", "◆ 4…"))
