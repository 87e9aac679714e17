"""The compare table: the numbers that compare runs across η and B (Jastrzebski et al. 2020),
one row per run when it fits the width, else one column per run, with a legend line."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from stiffmon.summary import fmt, precond_mark
from stiffmon.tui.renderables.axes import asciify, cut

WHY = {"threshold": "thr", "early-peak": "pk", "peak": "pk", "catapult": "cat"}
WIDE = 118  # below this width the table is transposed


def be_cell(s: dict[str, Any], ascii: bool = False) -> str:
    """``280 pk`` (confirmed), ``280 pk◇`` (tentative), ``not yet``."""
    step = s.get("break_even_step")
    status = s.get("break_even_status", "confirmed")
    if step is None or status == "none":
        return "not yet"
    mark = ("o" if ascii else "◇") if status == "tentative" else ""
    if status == "tentative" and s.get("diverged"):  # no later measurement will confirm it
        mark = "x" if ascii else "✕"
    return f"{step:,} {WHY.get(str(s.get('break_even_reason')), '?')}{mark}"


Field = tuple[str, Callable[[dict[str, Any], bool], str]]
FIELDS: tuple[Field, ...] = (
    ("η", lambda s, a: fmt(s.get("lr"), ".3g")),
    ("B", lambda s, a: fmt(s.get("batch_size"))),
    ("β", lambda s, a: fmt(s.get("momentum"), ".2g")),
    ("η/B", lambda s, a: fmt(s.get("lr_over_batch"), ".2g")),
    ("thr", lambda s, a: precond_mark(s, "threshold_now", a)),
    ("BE", be_cell),
    ("λH@BE", lambda s, a: precond_mark(s, "lambda1_at_break_even", a)),
    ("λH pk", lambda s, a: fmt(s.get("peak_lambda1_h"), ".3g")),
    ("λK pk", lambda s, a: fmt(s.get("peak_lambda1_k"), ".3g")),
    ("λH aft", lambda s, a: fmt(s.get("mean_lambda1_h_after"), ".3g")),
    ("λK aft", lambda s, a: fmt(s.get("mean_lambda1_k_after"), ".3g")),
    ("TrK aft", lambda s, a: fmt(s.get("mean_trace_k_after"), ".3g")),
    ("loss", lambda s, a: fmt(s.get("final_loss"), ".3g")),
)
LEGEND = (
    "BE break-even step: thr λ1 reached the run's stability threshold (row thr: 2/η SGD, "
    "(2+2β)/η momentum), pk early peak, cat catapult, ◇ tentative, ✕ diverged before confirmed; "
    "η, β latest learning rate, momentum (Adam β1); ᴾ λ1(P⁻¹H) of an adaptive run; pk peak; "
    "aft mean after BE"
)


def compare_table(
    runs: Sequence[tuple[str, str, dict[str, Any]]], width: int, ascii: bool = False
) -> RenderableType:
    """Runs as (name, colour, ``summary.run_summary`` dict)."""
    conv = asciify if ascii else str
    legend = Text(conv(LEGEND), style="dim")
    if width >= WIDE:
        t = Table(
            box=None if ascii else box.SIMPLE_HEAD,
            header_style="bold underline" if ascii else "bold",
            pad_edge=False,
        )
        t.add_column("run", no_wrap=True, overflow=cut(ascii), max_width=24)
        for head, _ in FIELDS:
            t.add_column(conv(head), justify="right", no_wrap=True)
        t.add_column("status", no_wrap=True)
        for name, color, s in runs:
            t.add_row(
                Text(conv(name), style=color),
                *(conv(f(s, ascii)) for _, f in FIELDS),
                conv(str(s.get("status", ""))),
            )
        return Group(t, legend)
    col_w = max(8, min(16, (width - 9) // max(1, len(runs)) - 1))
    t = Table(box=None, header_style="bold", pad_edge=False, expand=False, padding=(0, 1, 0, 0))
    t.add_column("", no_wrap=True, style="bold")
    for name, color, _ in runs:
        t.add_column(
            Text(conv(name), style=f"bold {color}"),
            justify="right",
            no_wrap=True,
            overflow=cut(ascii),
            max_width=col_w,
        )
    for head, f in FIELDS:
        t.add_row(conv(head), *(conv(f(s, ascii)) for _, _, s in runs))
    return Group(t, legend)
