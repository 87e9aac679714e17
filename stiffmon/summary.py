"""``stiffmon summary``: per run, the numbers that compare learning rates and batch sizes.

Two tables, each within 80 columns: the run's settings and state, and its break-even point
with the quantities Jastrzebski et al. (2020) compare across η and B (λ1_H there, the peaks of
λ1_H and λ1_K, and the means of λ1_H, λ1_K and Tr K after a confirmed break-even).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from rich import box
from rich.console import Group
from rich.table import Table

from stiffmon import derive
from stiffmon.marks import BREAK_EVEN_MARKS, be_symbol, marks_legend
from stiffmon.process_check import writer_state
from stiffmon.run_health import Health
from stiffmon.store import RunData, Store

REASON_MARK = {"threshold": "", "early-peak": "ᵖ", "catapult": "ᶜ", "none": ""}

BREAK_EVEN_LEGEND = (
    "break-even: first step where λ1_H reaches its stability threshold thr (2/η for SGD, "
    "(2+2β)/η heavy ball) and stays within 5 %; ᵖ end of the rise to the early-phase peak "
    "(thr not reached); ᶜ catapult (a one-measurement spike above thr); {marks} (tentative: "
    "not confirmed yet; diverged: tentative when the run diverged). after: mean over the "
    "measurements after a confirmed break-even. Adaptive "
    "optimizers: judged on the preconditioned λ1 and its threshold, marked ᴾ (λ1(P⁻¹H))."
)


def precond_mark(s: dict[str, Any], key: str, ascii: bool = False) -> str:
    """``s[key]`` formatted, with ``ᴾ`` when a :func:`run_summary`'s break-even was judged on
    λ1(P⁻¹H) (an adaptive run) and there is a value."""
    value = s.get(key)
    text = fmt(value, ".3g")
    precond = s.get("break_even_series") == "sharpness/lambda1_precond"
    if not precond or value is None or (isinstance(value, float) and math.isnan(value)):
        return text
    return text + ("P" if ascii else "ᴾ")


def ended_health(rd: RunData, now: float | None = None) -> Health:
    """:meth:`RunData.health` of a run whose source has been read to its end: a recorded run
    without a bye asks whether its writer still runs (on this machine), else it crashed."""
    writer = None
    if rd.hello is not None and not rd.finished:
        writer = writer_state(rd.hello.host, rd.hello.pid, rd.hello.t)
    return rd.health(now, ended=True, writer=writer)


def run_status(rd: RunData, now: float | None = None, health: Health | None = None) -> str:
    """The run's state in the app's words (:meth:`RunData.health`): ``finished``, ``exited``,
    ``no bye (crashed?)`` for a recorded run that ended without a bye (``no bye yet (writer pid
    N still running)`` while it is being written), ``live``, ``stalled 12s`` …; with
    ``, diverged @N`` when its loss diverged (``health``: :func:`ended_health`, if known) and
    ``, stalls: 1 (60s at step 300)`` when its loop hung (told from the step times by the live
    monitor's rule: :mod:`stiffmon.replay_stalls`)."""
    h = health or ended_health(rd, now)
    text = h.text
    if rd.diverged_step is not None:
        text += f", diverged @{rd.diverged_step:,}"
    stalls = rd.stall_log.summary()
    return f"{text}, {stalls}" if stalls else text


def solve_attrs(rd: RunData, spectrum: str = "hessian", suffix: str = "") -> dict[str, Any]:
    """How the latest ``spectrum`` measurement's threshold was set and whether its solve
    converged (the attributes the agent sends with it; ``stiffmon export``'s ``attrs``).

    Keys (``suffix`` appended to ``threshold_*``, and after ``sharpness`` in the others):
    ``threshold_rule`` (e.g. ``2/η - wd (SGD, group 1)``), ``threshold_group`` (the param group
    that set the threshold, −1 if none), ``sharpness_converged`` (that measurement's
    eigensolver), ``sharpness_unconverged`` (how many of the run's measurements did not
    converge); None where nothing says (no measurement, or an agent from before these).
    """
    snaps = rd.spectra.get(spectrum, [])
    attrs = dict(getattr(snaps[-1].msg, "attrs", None) or {}) if snaps else {}
    rule, group, converged = (
        attrs.get("threshold_rule"),
        attrs.get("threshold_group"),
        attrs.get("converged"),
    )
    said = [getattr(s.msg, "attrs", {}).get("converged") for s in snaps]
    said = [c for c in said if isinstance(c, bool)]
    return {
        f"threshold_rule{suffix}": rule if isinstance(rule, str) else None,
        f"threshold_group{suffix}": group if type(group) is int else None,
        f"sharpness{suffix}_converged": converged if isinstance(converged, bool) else None,
        f"sharpness{suffix}_unconverged": said.count(False) if said else None,
    }


def run_summary(rd: RunData, now: float | None = None) -> dict[str, Any]:
    """The comparison numbers of one run (NaN / None where not measured).

    ``lr`` and ``momentum`` are param group 0's, ``lrs`` every group's last η and ``lr_groups``
    how many different η schedules the groups have (:meth:`RunData.distinct_groups`).
    ``break_even_*`` describe :meth:`RunData.break_even`; ``break_even_threshold`` and
    ``lr_at_break_even`` are the threshold and η (param group 0) in force at its step (the last
    published at or before it, as the marker was judged), NaN without a marker; ``lr`` and
    ``threshold`` are the last ones (a schedule moves them); ``mean_*_after`` are NaN unless the
    marker is confirmed; ``break_even_k_*`` describe the early-phase peak of λ1_K;
    ``threshold_precond`` and ``peak_lambda1_precond`` are the last threshold and the peak of
    λ1(P⁻¹H), the preconditioned sharpness an adaptive run's break-even is judged on (NaN for
    SGD; an adaptive run's ``threshold``, λ1_H's, is NaN: preconditioned steps have none);
    the ``threshold_*`` / ``sharpness_*converged`` keys are :func:`solve_attrs` of λ1_H and, with
    ``_precond``, of λ1(P⁻¹H) (adaptive optimizers; None elsewhere). ``status``
    is :func:`run_status`, ``state`` and ``problems`` those of :meth:`RunData.health` (a recorded
    run without a bye has ended: ``no bye (crashed?)``); ``stalls`` the stretches without a new
    step longer than the live stall limit (:mod:`stiffmon.replay_stalls`), and ``events`` counts
    the run's own events (not the stalls a replay derives).
    """
    be = rd.break_even()
    be_k = rd.break_even_k()
    precond = be.series == "sharpness/lambda1_precond"
    thr_name = derive.threshold_series(precond)
    health = ended_health(rd, now)  # asks whether the writer runs: once
    opt = rd.optimizer
    xi = rd.last("xi/input")
    batch = rd.batch_size
    thr_at_be = lr_at_be = math.nan
    if be.step is not None:  # the values the marker was judged with (RunData.aligned)
        at = np.array([be.step], dtype=np.int64)
        thr_at_be = float(rd.aligned(thr_name, at)[0])
        lr_at_be = float(rd.aligned("lr/0", at)[0]) if "lr/0" in rd.scalars else rd.lr
    return {
        "run": rd.run,
        "name": rd.name,
        "optimizer": opt.get("type"),
        "lr": rd.lr,
        "lrs": [rd.last(f"lr/{i}") for i in rd.param_groups("lr")],
        "lr_groups": len(rd.distinct_groups("lr")),
        "momentum": rd.momentum,
        "batch_size": batch,
        "lr_over_batch": derive.lr_over_batch(rd.lr, batch),
        "steps": int(rd.scalars["loss"].steps[-1]) + 1 if len(rd.scalars.get("loss", ())) else 0,
        "final_loss": rd.last("loss"),
        "break_even_step": be.step,
        "break_even_reason": be.reason,
        "break_even_status": be.status,
        "break_even_series": be.series,
        "lambda1_at_break_even": be.value,
        "break_even_threshold": thr_at_be,
        "lr_at_break_even": lr_at_be,
        "catapults": list(be.catapults),
        "break_even_k_step": be_k.step,
        "break_even_k_status": be_k.status,
        "peak_lambda1_h": rd.peak("sharpness/lambda1_h"),
        "threshold": rd.last("sharpness/threshold"),
        "threshold_precond": rd.last(derive.threshold_series(True)),
        "peak_lambda1_precond": rd.peak("sharpness/lambda1_precond"),
        **solve_attrs(rd),
        **solve_attrs(rd, "hessian-precond", "_precond"),
        "peak_lambda1_k": rd.peak("noise/lambda1_k"),
        "mean_lambda1_h_after": rd.mean_after("sharpness/lambda1_h", be),
        "mean_lambda1_k_after": rd.mean_after("noise/lambda1_k", be),
        "mean_trace_k_after": rd.mean_after("noise/trace_k", be),
        "trace_k": rd.last("noise/trace_k"),
        "xi": xi,
        "within_minus_between": rd.last("stiffness/cos/train-train/within")
        - rd.last("stiffness/cos/train-train/between"),
        "diverged_step": rd.diverged_step,
        "events": len(rd.events) - len(rd.stall_events),  # the run's own, not the derived
        "stalls": [
            {"step": st.step, "t": st.t, "seconds": st.seconds, "resumed": st.resumed}
            for st in rd.stall_log.stalls
        ],
        "dropped": rd.dropped,  # messages the agent lost (its last heartbeat says)
        "status": run_status(rd, now, health),
        "state": health.state,
        "problems": list(health.problems),
    }


def fmt(v: Any, spec: str = ".4g") -> str:
    """A number for a table: "—" for None / NaN; exponents short (1.27e4, 3e-5)."""
    if v is None:
        return "—"
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        text = format(v, spec)
        if "e" not in text:
            return text
        mantissa, exponent = text.split("e")
        return f"{mantissa}e{int(exponent)}"
    return str(v)


def fmt_break_even(step: int | None, reason: str, status: str, diverged: bool = False) -> str:
    """Break-even cell: the mark of its status (:mod:`stiffmon.marks`: ◆ confirmed, ◇ tentative,
    ✕ tentative in a run that diverged) and the step, ᵖ / ᶜ for an early peak / catapult."""
    if step is None:
        return BREAK_EVEN_MARKS["none"].words if status == "none" else "—"
    return f"{be_symbol(status, diverged)} {step:,}{REASON_MARK.get(reason, '')}"


AFTER_KEYS = (
    "peak_lambda1_h",
    "peak_lambda1_k",
    "mean_lambda1_h_after",
    "mean_lambda1_k_after",
    "mean_trace_k_after",
)


def summary_table(store: Store) -> Group:
    """Two Rich tables (settings, then break-even), each within 80 columns; --json has all."""
    rows = [run_summary(rd) for rd in store.runs.values()]
    runs = Table(
        title="stiffmon summary", header_style="bold", box=box.SIMPLE_HEAD, caption_justify="left"
    )
    runs.add_column("run", justify="left", overflow="fold", min_width=8)
    for col in ("last η", "β", "B", "η/B", "steps", "loss", "ξ"):
        runs.add_column(col, justify="right", overflow="fold")  # folded, not cut, if need be
    runs.add_column("status", justify="left", min_width=6)  # "no bye (crashed?)" may wrap
    for s in rows:
        runs.add_row(
            s["name"],
            fmt(s["lr"], ".3g") + (" g0" if s["lr_groups"] > 1 else ""),
            fmt(s["momentum"], ".2g"),
            fmt(s["batch_size"]),
            fmt(s["lr_over_batch"], ".2g"),
            fmt(s["steps"]),
            fmt(s["final_loss"], ".3g"),
            fmt(s["xi"], ".2f"),
            s["status"],
        )
    runs.caption = (
        "last η, β: learning rate and momentum (Adam: β1) of param group 0 at the last step (a "
        "schedule moves them; g0: the groups' η differ, --json has every group's as lrs); "
        "η/B: η over the batch size; ξ: critical length in input space"
    )
    be = Table(
        title="break-even (Jastrzebski et al. 2020)",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        caption_justify="left",
        pad_edge=False,  # two more columns for the numbers
    )
    be.add_column("run", justify="left", overflow="fold", min_width=6)
    cells = [
        [
            fmt_break_even(
                s["break_even_step"],
                s["break_even_reason"],
                s["break_even_status"],
                s["diverged_step"] is not None,
            ),
            precond_mark(s, "break_even_threshold"),
            precond_mark(s, "lambda1_at_break_even"),
            *(fmt(s[key], ".3g") for key in AFTER_KEYS),
        ]
        for s in rows
    ]
    for col in ("break-\neven", "thr", "λ1_H\nthere", "peak\nλ1_H", "peak\nλ1_K"):
        be.add_column(col, justify="right", overflow="fold")  # folded, never cut
    for col in ("λ1_H\nafter", "λ1_K\nafter", "Tr K\nafter"):
        be.add_column(col, justify="right", overflow="fold")
    for s, row in zip(rows, cells, strict=True):
        be.add_row(s["name"], *row)
    be.caption = BREAK_EVEN_LEGEND.format(marks=marks_legend(none=False, catapult=False))
    thr = threshold_table(store)
    return Group(runs, be, thr) if thr is not None else Group(runs, be)


def threshold_table(store: Store) -> Table | None:
    """Per run, the threshold its break-even is judged on (λ1(P⁻¹H)'s for an adaptive run that
    publishes it, marked ᴾ, else λ1_H's): its last value, the peak of that λ1, the latest
    measurement's rule and how that eigensolver fared; None when no run says any of these."""
    table = Table(
        title="stability threshold",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        caption_justify="left",
    )
    table.add_column("run", justify="left", overflow="fold", min_width=6)
    table.add_column("thr", justify="right", overflow="fold")
    table.add_column("peak\nλ1", justify="right", overflow="fold")
    # one column, two lines: beside the numbers the rule (up to 37 characters) would wrap
    table.add_column("rule (latest)\neigensolver", justify="left", overflow="fold")
    for rd in store.runs.values():
        series = rd.break_even().series
        precond = series == "sharpness/lambda1_precond"
        spectrum = "hessian-precond" if precond and rd.spectra.get("hessian-precond") else "hessian"
        rule = solve_attrs(rd, spectrum)["threshold_rule"]
        solver = solver_words(rd, spectrum)
        thr = rd.last(derive.threshold_series(precond))
        if rule or solver or not math.isnan(thr):
            mark = "ᴾ" if precond else ""
            peak = rd.peak(series)
            cells = [fmt(v, ".3g") + (mark if not math.isnan(v) else "") for v in (thr, peak)]
            table.add_row(rd.name, *cells, f"{rule or '—'}\n{solver or '—'}")
    table.caption = (
        "thr, peak λ1: the last threshold and the highest λ1 the break-even is judged on "
        "(ᴾ: λ1(P⁻¹H) and its threshold, adaptive optimizers; else λ1_H); rule: of the latest "
        "measurement, with the param group that set the threshold; eigensolver (below it): "
        "whether the top-eigenvalue solves converged (λ1_H; ᴾ: λ1(P⁻¹H))"
    )
    return table if table.row_count else None


def solver_words(rd: RunData, spectrum: str = "hessian") -> str:
    """``all 75 converged``, ``1 of 75 not converged`` (``, latest`` when the latest is one);
    ``""`` when no measurement says (``ᴾ`` before it for the preconditioned one)."""
    said = [getattr(s.msg, "attrs", {}).get("converged") for s in rd.spectra.get(spectrum, [])]
    said = [c for c in said if isinstance(c, bool)]
    if not said:
        return ""
    mark = "ᴾ " if spectrum == "hessian-precond" else ""
    failed = said.count(False)
    if not failed:
        return f"{mark}all {len(said)} converged"
    latest = ", latest" if not said[-1] else ""
    return f"{mark}{failed} of {len(said)} not converged{latest}"


def summary_json(store: Store) -> list[dict[str, Any]]:
    """JSON-ready rows (NaN becomes null)."""
    rows = []
    for rd in store.runs.values():
        row = run_summary(rd)
        rows.append({k: _json_ready(v) for k, v in row.items()})
    return rows


def _json_ready(v: Any) -> Any:
    """NaN becomes None, in lists too (``lrs``)."""
    if isinstance(v, list):
        return [_json_ready(x) for x in v]
    return None if isinstance(v, float) and math.isnan(v) else v
