"""Sharpness: λ1_H per run with its stability threshold, break-even markers and their reasons;
the preconditioned sharpness of adaptive runs when the agent measures it."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from rich.console import RenderableType
from rich.text import Text
from textual.containers import Vertical
from textual.widget import Widget
from textual.widgets import Static

from stiffmon import derive
from stiffmon.marks import CATAPULT, be_symbol, marks_legend
from stiffmon.store import RunData
from stiffmon.tui.renderables import Marker, StepLine, asciify
from stiffmon.tui.renderables.axes import WordCutLines
from stiffmon.tui.runlines import run_end, series_x
from stiffmon.tui.views.base import Builder, ChartView, View, be_marker, capped, run_color

THRESHOLD_EVENTS = ("threshold-none", "threshold-unknown")
"""Codes of the agent's events saying why a run's λ1_H has no stability threshold."""

REASONS = {
    "threshold": "threshold",
    "early-peak": "early peak",
    "peak": "early peak",
    "catapult": "catapult",
}


SHARPNESS_SERIES = (
    "sharpness/lambda1_h",
    "sharpness/threshold",
    "sharpness/lambda1_precond",
    "sharpness/threshold_precond",
)


def break_even_of(rd: RunData) -> Any:
    """The run's break-even, computed again only when its sharpness series changed."""
    return rd.memoized("break_even", rd.data_key(*SHARPNESS_SERIES), rd.break_even)


def threshold_rule(rd: RunData, spectrum: str = "hessian") -> str:
    """The rule of the run's latest stability threshold, e.g. ``2/η - wd (SGD, group 1)``."""
    snaps = rd.spectra.get(spectrum, [])
    rule = snaps[-1].msg.attrs.get("threshold_rule") if snaps else None
    return rule if isinstance(rule, str) else ""


def shared_formula(rules: list[str]) -> str:
    """The formula of every run's rule (``2/η``) when they all have the same one, else ``""``."""
    formulas = {r.split(" (", 1)[0] for r in rules if r and not r.startswith("none")}
    return formulas.pop() if len(formulas) == 1 else ""


def rules_title(rules: list[str]) -> str:
    """``2/η`` when every run's rule has the same formula, else ``per run (below)``."""
    if shared := shared_formula(rules):
        return f" {shared}"
    if any(r and not r.startswith("none") for r in rules):
        return " per run (below)"
    return "" if any(rules) else " 2/η"  # sessions from before rules were sent: SGD's 2/η


def deciding_rule(rd: RunData) -> str:
    """The rule of the threshold the run is judged on: λ1_H's, or the preconditioned one."""
    rule = threshold_rule(rd)
    if not rule or rule.startswith("none"):
        return threshold_rule(rd, "hessian-precond") or rule
    return rule


def no_threshold_reason(rd: RunData) -> str:
    """Why the run has no stability threshold now (``NAdam is adaptive …``); ``""`` when it has
    one, or nothing has said why not yet.

    From the rule of its latest measurement (``none: <reason>``; the preconditioned one's where
    λ1(P⁻¹H) is measured), else, for a run whose measurements carry no rule and no threshold,
    from the agent's event saying why (:data:`THRESHOLD_EVENTS`)."""
    rule, prule = threshold_rule(rd), threshold_rule(rd, "hessian-precond")
    if prule and not prule.startswith("none"):
        return ""
    for r in (prule, rule):
        if r.startswith("none"):
            return r.removeprefix("none").lstrip(":").strip() or "none known"
    values = (rd.last("sharpness/threshold"), rd.last("sharpness/threshold_precond"))
    if rule or prule or any(math.isfinite(v) for v in values):
        return ""
    for ev in reversed(rd.events):
        if ev.code in THRESHOLD_EVENTS:
            head, sep, why = ev.message.partition(": ")
            return why if sep and head.startswith("no stability threshold") else ev.message
    return ""


def had_threshold(rd: RunData) -> bool:
    """Whether any measurement of the run had a finite stability threshold (raw or
    preconditioned): one drawn on the chart, even if there is none now."""
    for name in (derive.threshold_series(False), derive.threshold_series(True)):
        s = rd.series(name)
        if s is not None and len(s) and bool(np.isfinite(s.values).any()):
            return True
    return False


def with_value(rule: str, value: float, shared: str = "") -> str:
    """``(2+2β)/η = 190 (SGD, group 0)``: the rule's formula with its current value; only
    ``190 (SGD, group 0)`` when the formula is ``shared`` (the chart's title says it)."""
    if rule.startswith("none") or not math.isfinite(value):
        return rule
    formula, sep, rest = rule.partition(" (")
    if formula == shared:
        return f"{value:.4g}{sep}{rest}"
    return f"{formula} = {value:.4g}{sep}{rest}"


def first_finite_step(rd: RunData, name: str) -> int | None:
    """The step of the first finite measurement of the series ``name`` (None: none)."""
    s = rd.series(name)
    if s is None:
        return None
    ok = np.flatnonzero(np.isfinite(s.values))
    return int(s.steps[ok[0]]) if len(ok) else None


def be_words(rd: RunData) -> str:
    """``break-even 280 (early peak) λ1_H 1.96``, or ``no break-even yet``.

    A catapult at the run's first measurement says that λ1 was above the threshold from there
    (derive's rule names it a catapult; it is not a jump seen in training).
    Once the run said bye, ``no break-even``: it ended without one. A diverged run says so.
    """
    be = break_even_of(rd)
    status = getattr(be, "status", "confirmed")
    cats = tuple(getattr(be, "catapults", ()))
    if be.reason == "catapult":  # the marker itself names the first one
        cats = tuple(c for c in cats if c != be.step)
    extra = f"; catapult at {', '.join(f'{c:,}' for c in cats[:3])}" if cats else ""
    if rd.diverged_step is not None:  # later measurements are skipped: say why it stops
        extra += f"; ⚠ diverged at step {rd.diverged_step:,}"
    if be.step is None or status == "none":
        return ("no break-even" if rd.finished else "no break-even yet") + extra
    why = REASONS.get(be.reason, be.reason)
    precond = str(getattr(be, "series", "")).endswith("precond")
    lam = "λ1(P⁻¹H)" if precond else "λ1_H"
    if be.reason == "catapult" and be.step == first_finite_step(rd, getattr(be, "series", "")):
        why += ": started above thr"  # λ1 over it at the first measurement, under it next
    tent = ", tentative" if status == "tentative" else ""
    if status == "tentative" and rd.diverged_step is not None:
        tent = ", never confirmed: the run diverged"
    name = derive.threshold_series(precond)
    thr = float(rd.aligned(name, np.array([be.step]))[0])
    moved = math.isfinite(thr) and not math.isclose(thr, rd.last(name), rel_tol=1e-9)
    there = f", threshold {thr:.4g} there" if moved else ""  # an lr schedule moved it since
    return f"break-even {be.step:,} ({why}{tent}) {lam} {be.value:.3g}{there}{extra}"


def threshold_line(view: View, rd: RunData, name: str, color: str) -> StepLine | None:
    """The run's threshold series ``name`` as a dashed step line: each measured value held
    until the next measurement (an lr schedule moves it), the last up to the run's end; None
    without a finite value. Not smoothed: it is the bound at each step, not a noisy estimate."""
    s = rd.series(name)
    if s is None or not len(s):
        return None
    ok = np.isfinite(s.values)
    if not ok.any():
        return None
    x = series_x(rd, s.steps, s.times, view.app.x_time)
    end = run_end(rd, view.app.x_time)
    return StepLine(x[ok], s.values[ok].astype(np.float64), color, "thr", x_end=end)


def sharpness_chart(view: View, compact: bool) -> Builder:
    """λ1_H of every visible run, dashed thresholds, break-even and catapult marks
    (:mod:`stiffmon.marks`); the full view adds the preconditioned λ1(P⁻¹H) of adaptive runs
    with their thresholds (the overview's ``λ1_H`` chart does not: another quantity, on another
    scale)."""
    kinds = [("sharpness/lambda1_h", "sharpness/threshold", "")]
    if not compact:
        kinds.append(("sharpness/lambda1_precond", "sharpness/threshold_precond", " precond"))

    def build(width: int, height: int) -> RenderableType:
        lines, steplines, markers, marks = [], [], [], []
        for rd in view.runs():
            c = run_color(rd)
            for name, thr_name, suffix in kinds:
                xy = view.xy(rd, name)
                if xy is None:
                    continue
                lines.append(view.run_line(rd, name, xy, c, rd.name + suffix))
                thr = threshold_line(view, rd, thr_name, c)
                if thr is not None:  # up to the run's end; named where above the chart
                    steplines.append(thr)
            if not rd.series("sharpness/lambda1_h"):
                continue
            marks += view.skip_marks(rd, "sharpness", "sharpness/lambda1_h")
            be = break_even_of(rd)
            status = getattr(be, "status", "confirmed")
            if be.step is not None and status != "none":
                bx = view.x_of_step(rd, "sharpness/lambda1_h", be.step)
                markers.append(be_marker(bx, be.value, c, status, rd.diverged_step is not None))
            s = rd.series("sharpness/lambda1_h")
            for cat in getattr(be, "catapults", ()):
                if s is not None:
                    i = min(len(s) - 1, int(s.steps.searchsorted(cat)))
                    x = view.x_of_step(rd, "sharpness/lambda1_h", cat)
                    markers.append(Marker(x, float(s.values[i]), c, CATAPULT.symbol))
        measured = [rd for rd in view.runs() if rd.series("sharpness/lambda1_h")]
        rules = [deciding_rule(rd) for rd in measured]
        precond = any(ln.label.endswith(" precond") for ln in lines)
        named = f"╌ stability threshold{rules_title(rules)}"
        if measured and not steplines and all(no_threshold_reason(rd) for rd in measured):
            named = "no stability threshold (why: below)"  # no dashed line to name
        title = (  # the overview's legend is a clause: dropped first where the title is cut
            f"λ1_H (sharpness); {marks_legend(none=False)}"
            if compact
            else f"λ1_H{' and precond λ1(P⁻¹H)' if precond else ''} per run, {named}"
        )
        return view.chart(
            lines,
            title,
            height,
            steplines=steplines,
            markers=markers,
            x_marks=marks,
            legend=precond,
            empty_text=view.why_empty(
                "sharpness/lambda1_h", "λ1_H", yet="no sharpness measurement yet"
            ),
        )

    return build


class Sharpness(View):
    name = "sharpness"
    key = "4"
    title = "sharpness"

    def widget(self) -> Widget:
        return Vertical(
            ChartView(sharpness_chart(self, compact=False), classes="chart"),
            Static(id="sharpness-why"),
            id=self.name,
        )

    def refresh(self) -> None:
        legend = f"{marks_legend()}: break-even marks"
        lines = [Text(asciify(legend) if self.app.ascii else legend, style="dim")]
        names: list[str] = []
        shared = shared_formula(
            [deciding_rule(rd) for rd in self.runs() if rd.series("sharpness/lambda1_h")]
        )
        for rd in self.runs():
            if not rd.series("sharpness/lambda1_h"):
                continue
            status = getattr(break_even_of(rd), "status", "confirmed")
            sym = be_symbol(status, rd.diverged_step is not None)
            words = f"{sym} {rd.name}: {be_words(rd)}"
            rule, prule = threshold_rule(rd), threshold_rule(rd, "hessian-precond")
            # the last measurement's threshold, after the one of the mark's step where given
            now = "now" if " there" in words else "threshold"
            if why := no_threshold_reason(rd):  # say why there is none (NAdam, Adagrad …)
                if had_threshold(rd):  # one is drawn up to here: where its words would be
                    words += f"; {'now ' if now == 'now' else ''}no stability threshold: {why}"
                else:  # never one: first, where a narrow screen does not cut it off
                    words = f"{sym} {rd.name}: no stability threshold: {why}; {be_words(rd)}"
            elif rule and not (rule.startswith("none") and prule):
                words += f"; {now} {with_value(rule, rd.last('sharpness/threshold'), shared)}"
            elif not rule and math.isfinite(rd.last("sharpness/threshold")):
                words += f"; {now} {rd.last('sharpness/threshold'):.4g}"
            if prule and not why:
                thr = rd.last("sharpness/threshold_precond")
                pre = "preconditioned threshold now" if now == "now" else "preconditioned threshold"
                words += f"; {pre} {with_value(prule, thr, shared)}"
            lines.append(Text(asciify(words) if self.app.ascii else words, style=run_color(rd)))
            names.append(rd.name)
        box = self.app.query_one("#sharpness-why", Static)

        def more(left: list[Text]) -> Text:  # runs past the box's height: named, not dropped
            runs = ", ".join(names[len(names) - len(left) :])
            words = f"+{len(left)} more runs (their break-even: view 6): {runs}"
            return Text(asciify(words) if self.app.ascii else words, style="dim")

        box.update(WordCutLines(capped(box, lines, more), self.app.ascii))  # no number cut
        super().refresh()
