"""``stiffmon summary``: one row per run with the numbers that compare learning rates."""

from __future__ import annotations

import math
from typing import Any

from rich import box
from rich.table import Table

from stiffmon import derive
from stiffmon.store import RunData, Store


def run_summary(rd: RunData, now: float | None = None) -> dict[str, Any]:
    """The comparison numbers of one run (NaN / None where not measured)."""
    be = rd.break_even()
    opt = rd.optimizer
    xi = rd.last("xi/input")
    return {
        "run": rd.run,
        "name": rd.name,
        "optimizer": opt.get("type"),
        "lr": rd.lr,
        "momentum": rd.momentum,
        "batch_size": rd.batch_size,
        "lr_over_batch": derive.lr_over_batch(rd.lr, rd.batch_size),
        "steps": int(rd.scalars["loss"].steps[-1]) + 1 if len(rd.scalars.get("loss", ())) else 0,
        "final_loss": rd.last("loss"),
        "break_even_step": be.step,
        "break_even_reason": be.reason,
        "peak_lambda1_h": rd.peak("sharpness/lambda1_h"),
        "threshold": rd.last("sharpness/threshold"),
        "peak_lambda1_k": rd.peak("noise/lambda1_k"),
        "trace_k": rd.last("noise/trace_k"),
        "xi": xi,
        "within_minus_between": rd.last("stiffness/cos/train-train/within")
        - rd.last("stiffness/cos/train-train/between"),
        "events": len(rd.events),
        "dropped": rd.dropped,  # messages the agent lost (its last heartbeat says)
        "status": rd.status(now),
    }


def fmt(v: Any, spec: str = ".4g") -> str:
    """A number for a table: "—" for None / NaN."""
    if v is None:
        return "—"
    if isinstance(v, float):
        return "—" if math.isnan(v) else format(v, spec)
    return str(v)


def summary_table(store: Store) -> Table:
    """A Rich table with one row per run (all numbers, η/B and Tr K included, are in --json)."""
    table = Table(title="stiffmon summary", header_style="bold", box=box.SIMPLE_HEAD)
    table.add_column("run", justify="left", overflow="fold", min_width=8)
    for col in (
        "η",
        "β",
        "B",
        "steps",
        "loss",
        "break-even",
        "peak λ1_H",
        "threshold",
        "peak λ1_K",
        "ξ",
    ):
        table.add_column(col, justify="right")
    table.add_column("status", justify="left")
    for rd in store.runs.values():
        s = run_summary(rd)
        be = fmt(s["break_even_step"]) + ("ᵖ" if s["break_even_reason"] == "peak" else "")
        table.add_row(
            s["name"],
            fmt(s["lr"], ".3g"),
            fmt(s["momentum"], ".2g"),
            fmt(s["batch_size"]),
            fmt(s["steps"]),
            fmt(s["final_loss"], ".3g"),
            be,
            fmt(s["peak_lambda1_h"], ".3g"),
            fmt(s["threshold"], ".3g"),
            fmt(s["peak_lambda1_k"], ".3g"),
            fmt(s["xi"], ".2f"),
            s["status"],
        )
    table.caption = "ᵖ: early-phase peak of λ1_H (the threshold was never reached)"
    return table


def summary_json(store: Store) -> list[dict[str, Any]]:
    """JSON-ready rows (NaN becomes null)."""
    rows = []
    for rd in store.runs.values():
        row = run_summary(rd)
        rows.append(
            {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        )
    return rows
