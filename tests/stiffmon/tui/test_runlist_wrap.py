"""The run list wraps a long state at its words: the last word (``gone``, ``alive``) is often
the news and must not be cut to ``…``; only one word too long for the list (an address) is cut."""

from __future__ import annotations

from rich.console import Console

from stiffmon.tui.renderables.runlist import RunList, RunRow


def lines_of(text: str, state: str, width: int = 22) -> list[str]:
    row = RunRow("sgd lr=0.1", "red", True, True, state, text, "error", 1075)
    console = Console(width=width, color_system=None, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(RunList([row]))
    return console.export_text().splitlines()


def test_writer_gone_is_not_cut() -> None:
    lines = lines_of("no bye (writer pid 67031 gone)", "ended")
    assert all(len(ln) <= 22 for ln in lines)
    assert not any("…" in ln for ln in lines), lines
    assert " ".join(" ".join(lines).split()).count("writer pid 67031 gone") == 1, lines


def test_still_running_and_stalled_are_whole() -> None:
    lines = lines_of("no bye yet (writer pid 4321 still running)", "replay")
    assert "writer pid 4321 still running" in " ".join(" ".join(lines).split())
    lines = lines_of("stalled 12s (no step since 1,149,000; agent alive)", "stalled")
    joined = " ".join(" ".join(lines).split())
    assert "no step since 1,149,000" in joined and "agent alive" in joined
    assert "step 1,075" in joined and not any("…" in ln for ln in lines)


def test_a_long_address_is_still_cut_not_broken() -> None:
    lines = lines_of("disconnected 12s (tcp://gpu-box.example.org:5555)", "stalled")
    assert any(ln.startswith("    tcp://gpu-box") and ln.rstrip().endswith("…") for ln in lines)


def test_coverage_says_why_whole() -> None:
    row = RunRow(
        "sgd lr=0.5",
        "red",
        True,
        True,
        "live",
        "live",
        "ok",
        722,
        problems=("diverged @500",),
        coverage=("gram 14/19 (not-finite)", "sharpness 14/19 (not-finite)"),
    )
    console = Console(width=22, color_system=None, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(RunList([row]))
    lines = console.export_text().splitlines()
    assert not any("…" in ln for ln in lines) and all(len(ln) <= 22 for ln in lines), lines
    joined = " ".join(" ".join(lines).split())
    assert "gram 14/19 (not-finite)" in joined and "sharpness 14/19 (not-finite)" in joined


def test_compare_loss_of_a_diverged_run_is_nan_not_a_dash() -> None:
    from stiffmon.tui.renderables.comparetable import compare_table

    runs = [
        ("div", "red", {"final_loss": float("nan"), "diverged": True, "lr": 0.5}),
        ("none", "blue", {"final_loss": None, "lr": 0.1}),
    ]
    console = Console(width=60, color_system=None, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(compare_table(runs, 60))
    loss = next(ln for ln in console.export_text().splitlines() if ln.startswith("loss"))
    assert loss.split()[1:] == ["NaN", "—"], loss


def test_follow_state_without_a_bracket_is_whole() -> None:
    lines = lines_of("no new record for 13s; writer alive", "replay")
    joined = " ".join(" ".join(lines).split())
    assert "no new record for 13s" in joined and "writer alive" in joined
    assert not any("…" in ln for ln in lines) and all(len(ln) <= 22 for ln in lines), lines
