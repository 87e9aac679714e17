"""The compare table: the numbers that compare runs across η and B (Jastrzebski et al. 2020),
one row per run when it fits the width, else one column per run, with a legend line."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from stiffmon.marks import BREAK_EVEN_MARKS, be_symbol, marks_legend
from stiffmon.summary import fmt
from stiffmon.tui.renderables.axes import asciify, cut, distinct_names

WHY = {"threshold": "thr", "early-peak": "pk", "peak": "pk", "catapult": "cat"}
WIDE = 118  # below this width the table is transposed
NAME_W = 24  # the run column of the wide table
PRECOND = "sharpness/lambda1_precond"


def be_cell(s: dict[str, Any], ascii: bool = False) -> str:
    """``◆ 280 pk`` (confirmed), ``◇ 280 pk`` (tentative), ``none yet``: the marks of
    :mod:`stiffmon.marks`."""
    step = s.get("break_even_step")
    status = s.get("break_even_status", "confirmed")
    if step is None or status == "none":
        return BREAK_EVEN_MARKS["none"].words  # no mark: the words say it, in less width
    sym = be_symbol(status, bool(s.get("diverged")), ascii)
    reason = str(s.get("break_even_reason"))
    return f"{sym} {step:,} {WHY.get(reason, reason)}"


def sharpness_cell(s: dict[str, Any], ascii: bool = False) -> str:
    """Which λ1 the row's ``thr`` and ``λ1@BE`` are about: ``H`` (λ1_H, SGD-like runs),
    ``P⁻¹H`` (the preconditioned λ1(P⁻¹H) of an adaptive run), ``—`` before a measurement."""
    if s.get("break_even_series") == PRECOND:
        return "P^-1H" if ascii else "P⁻¹H"
    peak = s.get("peak_lambda1_h")
    return "—" if peak is None or (isinstance(peak, float) and math.isnan(peak)) else "H"


def lr_cell(s: dict[str, Any], ascii: bool = False) -> str:
    """η of param group 0, ``g0`` after it when the run's groups have different η."""
    return fmt(s.get("lr"), ".3g") + (" g0" if s.get("lr_groups", 1) > 1 else "")


def thr_cell(s: dict[str, Any], ascii: bool = False) -> str:
    """``119@50``: the stability threshold of the last λ1 measurement with its step when the
    schedule moved η or β since (the η column's latest η is not the one it comes from)."""
    thr = fmt(s.get("threshold_now"), ".3g")
    step = s.get("threshold_step")
    return thr if step is None or thr == "—" else f"{thr}@{short_step(int(step))}"


def short_step(step: int) -> str:
    """A step in at most 5 characters: ``950``, ``12345``, ``123k``, ``1.2M``."""
    if step < 100_000:
        return str(step)
    if step < 1_000_000:
        return f"{step // 1000}k"
    return f"{step / 1e6:.2g}M" if step < 10_000_000 else f"{step // 1_000_000}M"


def loss_cell(s: dict[str, Any]) -> str:
    """The last loss; ``NaN`` where the run diverged on it (``—`` reads as no loss yet, and the
    narrow table has no status row to say why)."""
    v = s.get("final_loss")
    if s.get("diverged") and isinstance(v, float) and math.isnan(v):
        return "NaN"
    return fmt(v, ".3g")


Field = tuple[str, Callable[[dict[str, Any], bool], str]]
FIELDS: tuple[Field, ...] = (
    ("η", lr_cell),
    ("B", lambda s, a: fmt(s.get("batch_size"))),
    ("β", lambda s, a: fmt(s.get("momentum"), ".2g")),
    ("η/B", lambda s, a: fmt(s.get("lr_over_batch"), ".2g")),
    ("λ1", sharpness_cell),
    ("thr", thr_cell),
    ("BE", be_cell),
    ("λ1@BE", lambda s, a: fmt(s.get("lambda1_at_break_even"), ".3g")),
    ("λH pk", lambda s, a: fmt(s.get("peak_lambda1_h"), ".3g")),
    ("λK pk", lambda s, a: fmt(s.get("peak_lambda1_k"), ".3g")),
    ("λH aft", lambda s, a: fmt(s.get("mean_lambda1_h_after"), ".3g")),
    ("λK aft", lambda s, a: fmt(s.get("mean_lambda1_k_after"), ".3g")),
    ("TrK aft", lambda s, a: fmt(s.get("mean_trace_k_after"), ".3g")),
    ("loss", lambda s, a: loss_cell(s)),
)
LEGEND = (
    "break-even {marks}; BE its step: thr λ1 reached thr, pk early peak, cat catapult; "
    "λ1 the sharpness the row's thr and λ1@BE are about: H λ1_H (SGD), P⁻¹H λ1(P⁻¹H) "
    "preconditioned (adaptive runs); thr its stability threshold at the last λ1 measurement "
    "(2/η SGD, (2+2β)/η momentum, 38/η Adam at β1 = 0.9), @S: from the η, β of that step S, "
    "moved since; "
    "η, β latest learning rate, momentum (Adam β1) of param group 0 "
    "(g0: the groups' η differ); λH pk peak λ1_H; aft mean after BE"
)


def legend_text(ascii: bool = False) -> str:
    """The table's legend, with the break-even marks of :mod:`stiffmon.marks`."""
    text = LEGEND.format(marks=marks_legend(ascii, none=False, catapult=False))
    return asciify(text) if ascii else text


def table_rows(runs: int, width: int, ascii: bool = False) -> int:
    """The rows :func:`compare_table` takes for ``runs`` runs at ``width``, legend left out."""
    if width >= WIDE:
        return runs + (1 if ascii else 2)  # header (and its rule), a row per run
    return len(FIELDS) + 1  # the run names, a row per field


def legend_lines(width: int, rows: int | None, ascii: bool = False) -> Text:
    """The legend wrapped to ``width``, in at most ``rows`` lines: the last one ends in ``…``
    where it is cut (never mid-sentence without a sign)."""
    lines = textwrap.wrap(legend_text(ascii), max(8, width))
    if rows is not None and len(lines) > max(1, rows):
        lines = lines[: max(1, rows)]
        dots = "..." if ascii else "…"
        lines[-1] = lines[-1][: max(0, width - len(dots))].rstrip() + dots
    return Text("\n".join(lines), style="dim")


DROP_ORDER = ("TrK aft", "λK aft", "λH aft", "λK pk", "β", "B", "λ1", "λH pk", "λ1@BE", "thr")
"""Rows the narrow table leaves out first when the screen is short (η, η/B, BE, loss stay)."""


def left_out_note(names: Sequence[str], keep: Sequence[int]) -> str:
    """``not shown (no room): runs a, b; rows TrK aft``: what the narrow table leaves out."""
    left = [f"runs {', '.join(names)} (select with [ ])"] if names else []
    if len(keep) < len(FIELDS):
        left.append(f"rows {', '.join(h for j, (h, _) in enumerate(FIELDS) if j not in keep)}")
    return f"not shown (no room): {'; '.join(left)}" if left else ""


def first_shown(runs: int, shown: int, selected: int) -> int:
    """The first of ``shown`` consecutive runs (columns) of ``runs`` drawn: the page of
    ``shown`` runs that holds run ``selected`` (``[`` / ``]`` page through them; the last page
    ends at the last run, so it is full)."""
    if shown >= runs:
        return 0
    sel = min(max(0, selected), runs - 1)
    return min((sel // shown) * shown, runs - shown)


def narrow_layout(
    cells: list[list[str]],
    names: Sequence[str],
    width: int,
    max_rows: int | None,
    selected: int = 0,
) -> tuple[int, int, int, list[int], list[str]]:
    """Column width, the first run shown and how many runs (columns) fit ``width`` (the page
    that holds run ``selected``), which fields (rows) fit ``max_rows`` with the note of what
    is left out, and that note's lines: every cell whole."""
    need = max((len(c) for run in cells for c in run), default=1)
    col_w = max(need, 5, min(16, (width - 9) // max(1, len(cells)) - 1))
    shown = max(1, min(len(cells), (width - 9) // (col_w + 1)))
    start = first_shown(len(cells), shown, selected)
    hidden = [*names[:start], *names[start + shown :]]
    keep = list(range(len(FIELDS)))
    note = textwrap.wrap(left_out_note(hidden, keep), max(8, width))
    for head in DROP_ORDER:
        if max_rows is None or 1 + len(keep) + len(note) <= max_rows:
            break
        keep.remove(next(i for i, (h, _) in enumerate(FIELDS) if h == head))
        note = textwrap.wrap(left_out_note(hidden, keep), max(8, width))
    return col_w, start, shown, keep, note


def compare_table(
    runs: Sequence[tuple[str, str, dict[str, Any]]],
    width: int,
    ascii: bool = False,
    legend_rows: int | None = None,
    max_rows: int | None = None,
    selected: int = 0,
) -> RenderableType:
    """Runs as (name, colour, ``summary.run_summary`` dict), the legend in at most
    ``legend_rows`` lines (default: all it takes), all of it in ``max_rows`` lines (default:
    any). A narrow table never cuts a value: it shows the runs (columns) and fields (rows)
    that fit whole, and a note names the rest (a run's name may be cut, keeping names apart);
    the runs it shows are the page of them that holds run ``selected`` (an index into
    ``runs``), so every run can be brought in with ``[`` / ``]``."""
    conv = asciify if ascii else str
    if width >= WIDE:
        legend = legend_lines(width, legend_rows, ascii)
        t = Table(
            box=None if ascii else box.SIMPLE_HEAD,
            header_style="bold underline" if ascii else "bold",
            pad_edge=False,
        )
        t.add_column("run", no_wrap=True, overflow=cut(ascii), max_width=NAME_W)
        for head, _ in FIELDS:
            t.add_column(conv(head), justify="right", no_wrap=True)
        t.add_column("status", no_wrap=True)
        names = distinct_names([conv(n) for n, _, _ in runs], NAME_W, ascii)
        for name, (_, color, s) in zip(names, runs, strict=True):
            t.add_row(
                Text(name, style=color),
                *(conv(f(s, ascii)) for _, f in FIELDS),
                conv(str(s.get("status", ""))),
            )
        return Group(t, legend)
    cells = [[conv(f(s, ascii)) for _, f in FIELDS] for _, _, s in runs]
    all_names = [conv(n) for n, _, _ in runs]
    col_w, start, shown, keep, note = narrow_layout(cells, all_names, width, max_rows, selected)
    if shown < len(runs):  # "none yet" in 4 characters, if that lets more runs in
        short = [[c if c != "none yet" else "none" for c in run] for run in cells]
        layout = narrow_layout(short, all_names, width, max_rows, selected)
        if layout[2] > shown:
            cells, (col_w, start, shown, keep, note) = short, layout
    t = Table(box=None, header_style="bold", pad_edge=False, expand=False, padding=(0, 1, 0, 0))
    t.add_column("", no_wrap=True, style="bold")
    page = slice(start, start + shown)
    names = distinct_names(all_names[page], col_w, ascii)
    for name, (_, color, _) in zip(names, runs[page], strict=True):
        t.add_column(Text(name, style=f"bold {color}"), justify="right", no_wrap=True)
    for i in keep:
        t.add_row(conv(FIELDS[i][0]), *(run[i] for run in cells[page]))
    room = None if max_rows is None else max_rows - 1 - len(keep) - len(note)
    rows = room if legend_rows is None else min(legend_rows, room if room is not None else 99)
    parts: list[RenderableType] = [t]
    if note:
        parts.append(Text("\n".join(note), style="yellow"))
    if rows is None or rows >= 1:
        parts.append(legend_lines(width, rows, ascii))
    return Group(*parts)
