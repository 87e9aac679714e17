"""The run list when the runs do not fit: finished runs on one line, then every run but the
selected one, then a window that keeps the selected run in view and counts the others."""

from __future__ import annotations

from stiffmon import protocol as p
from stiffmon.store import Store
from stiffmon.tui.app import StiffmonApp
from stiffmon.tui.renderables.runlist import RunList, RunRow, shown, window_top
from stiffmon.tui.runpanel import RunPanel
from tests.stiffmon.tui.test_app import feed, screen_text


def _row(i: int, selected: bool = False, state: str = "live", **kw: object) -> RunRow:
    text = {"live": "live", "finished": "finished", "stalled": "stalled 5s"}[state]
    return RunRow(f"run {i}", "red", True, selected, state, text, "ok", 100 + i, **kw)  # type: ignore[arg-type]


def _lines(runs: RunList, width: int = 21) -> list[str]:
    return [line.plain for line in runs.layout(width)[1]]


def test_everything_fits_as_before() -> None:
    rows = [_row(0, True), _row(1, state="finished")]
    expected = ["■ run 0", "  ● live  step 100", "■ run 1", "  ✓ finished  step 101"]
    assert _lines(RunList(rows, height=10), 24) == _lines(RunList(rows), 24) == expected


def test_finished_runs_are_compacted_first_then_the_others() -> None:
    rows = [_row(0, True), _row(1, state="finished"), _row(2), _row(3, problems=["diverged @3"])]
    assert _lines(RunList(rows, height=8)) == [
        "■ run 0",
        "  ● live  step 100",
        "■ run 1         ✓ 101",
        "■ run 2",
        "  ● live  step 102",
        "■ run 3",
        "  ● live  step 103",
        "  ⚠ diverged @3",
    ]
    assert _lines(RunList(rows, height=5)) == [
        "■ run 0",
        "  ● live  step 100",
        "■ run 1         ✓ 101",
        "■ run 2         ● 102",
        "■ run 3       ● 103 ⚠",
    ]


def test_the_window_follows_the_selection_and_counts_what_it_hides() -> None:
    n = 20
    rows = [_row(i, i == n - 1, problems=["gram disabled"] if i == 0 else ()) for i in range(n)]
    top, lines = RunList(rows, height=8).layout(21)
    assert [ln.plain for ln in lines] == [
        "↑ 14 more runs, 1 ⚠",
        "■ run 14        ● 114",
        "■ run 15        ● 115",
        "■ run 16        ● 116",
        "■ run 17        ● 117",
        "■ run 18        ● 118",
        "■ run 19",
        "  ● live  step 119",
    ]
    assert top == 14
    rows = [_row(i, i == 0) for i in range(n)]
    lines = RunList(rows, height=8, ascii=True).layout(21)[1]
    assert lines[-1].plain == "v 14 more runs" and lines[0].plain == "# run 0"
    # scrolled by the wheel (no follow): stays where it was put, within the list
    assert RunList(rows, height=8, top=5, follow=False).layout(21)[0] == 5
    assert RunList(rows, height=8, top=99, follow=False).layout(21)[0] == 13


def test_window_top_moves_as_little_as_it_must() -> None:
    sizes = [1] * 10
    assert shown(sizes, 0, 5) == 4  # and a "↓ 6 more" line
    assert shown(sizes, 3, 5) == 3  # "↑ 3 more", three runs, "↓ 4 more"
    assert window_top(sizes, 2, 5, 0, follow=True) == 0
    assert window_top(sizes, 4, 5, 0, follow=True) == 2
    assert window_top(sizes, 3, 5, 2, follow=True) == 2  # already in view: no jump
    assert window_top(sizes, 2, 5, 4, follow=True) == 2  # up to it, no further
    assert window_top(sizes, 1, 5, 2, follow=True) == 0  # "↑ 1 more" would show no more
    assert window_top(sizes, 9, 5, 0, follow=True) == 6  # the last: no empty line below


async def test_selecting_the_last_of_many_runs_scrolls_it_into_view() -> None:
    store = Store()
    for i in range(12):
        feed(store, f"r{i:02d}", range(5), now=0.0)
        if i % 3 == 0:
            store.apply(p.Bye(run=f"r{i:02d}", seq=7, step=4, t=105.0, reason="closed"), now=0.0)
    app = StiffmonApp(store=store, clock=lambda: 0.0)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        for _ in range(11):
            await pilot.press("right_square_bracket")
        await pilot.pause()
        assert app.selected == 11
        assert "live r11" in screen_text(app)  # twelve runs fit with the finished ones short
        for i in range(12, 30):
            feed(store, f"r{i:02d}", range(5), now=0.0)
        await pilot.pause(0.3)
        panel = app.query_one("#runs", RunPanel)
        lines = [panel.render_line(y).text for y in range(panel.size.height)]
        assert any(ln.startswith("↓ ") and "more runs" in ln for ln in lines), lines
        for _ in range(18):
            await pilot.press("right_square_bracket")
        await pilot.pause()
        assert app.selected == 29
        lines = [panel.render_line(y).text for y in range(panel.size.height)]
        assert lines[0].startswith("↑ ") and "more runs" in lines[0], lines
        assert "live r29" in screen_text(app)
        assert not any("more runs" in ln for ln in lines[1:])
        await pilot.press("right_square_bracket")  # round to the first again
        await pilot.pause()
        lines = [panel.render_line(y).text for y in range(panel.size.height)]
        assert "live r00" in lines[0] and any(ln.startswith("↓ ") for ln in lines), lines


def test_compact_names_cut_where_they_differ() -> None:
    """Runs named after their settings differ at the end: a compact line keeps that part."""
    names = ["resnet lr=0.05", "resnet lr=0.2", "resnet lr=0.1"]
    rows = [
        RunRow(n, "red", True, i == 0, "finished", "finished", "ok", 100)
        for i, n in enumerate(names)
    ]
    lines = _lines(RunList(rows, height=5), 18)
    assert lines[3:] == ["■ …lr=0.2    ✓ 100", "■ …lr=0.1    ✓ 100"], lines  # not "resnet l…"
