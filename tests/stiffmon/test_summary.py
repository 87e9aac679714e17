"""``stiffmon summary`` and the RunData break-even helpers, on synthetic stores."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from rich.cells import cell_len
from rich.console import Console

from stiffmon import derive
from stiffmon import protocol as p
from stiffmon.session import SessionReader, SessionWriter
from stiffmon.store import Store
from stiffmon.summary import run_status, run_summary, summary_json, summary_table
from stiffmon.tui.renderables.comparetable import FIELDS, compare_table
from tests.stiffmon.test_process_check import dead_pid

STEPS = [*range(5), *range(20, 2001, 20)]


def sharpness(step: int) -> float:
    """λ1_H rising to 12 by step 600, then falling to 6 (threshold 2/η = 20 never reached)."""
    return 1.0 + 11.0 * step / 600 if step <= 600 else 12.0 - 6.0 * (step - 600) / 1400


def messages(
    run: str = "r", optimizer: str = "SGD", until: int = 2000, precond: bool = False
) -> list[p.Message]:
    hello = p.Hello(
        run=run,
        seq=0,
        step=0,
        t=0.0,
        name=f"{optimizer.lower()} lr=0.1",
        optimizer={"type": optimizer, "lr": 0.1, "momentum": 0.9},
        batch_size=32,
    )
    out: list[p.Message] = [hello]
    for k, s in enumerate(x for x in STEPS if x <= until):
        vals = {
            "loss": 2.0 / (1 + s),
            "lr/0": 0.1,
            "sharpness/lambda1_h": sharpness(s),
            "noise/lambda1_k": 0.5 * sharpness(s),
            "noise/trace_k": 3.0 * sharpness(s),
        }
        if s in (0, 1000):  # a threshold published only when it changes
            vals["sharpness/threshold"] = 20.0 if s == 0 else 40.0
        if precond:  # Adam: the preconditioned sharpness crosses its threshold 38 at step 400
            vals["sharpness/lambda1_precond"] = 0.1 * s
            vals["sharpness/threshold_precond"] = 38.0
        out.append(p.Scalars.from_dict(vals, run=run, seq=k + 1, step=s, t=float(s)))
    return out


def store_of(*runs: list[p.Message]) -> Store:
    st = Store()
    for msgs in runs:
        st.extend(msgs, replay=True)
    return st


def test_break_even_of_a_run_and_the_comparison_numbers() -> None:
    rd = store_of(messages()).runs["r"]
    lam = [sharpness(s) for s in STEPS]
    thr = [20.0 if s < 1000 else 40.0 for s in STEPS]
    assert rd.break_even() == derive.break_even(STEPS, lam, thr)
    be = rd.break_even()
    assert be.reason == "early-peak" and be.confirmed and be.step == 600
    row = run_summary(rd)
    assert row["lr"] == 0.1 and row["batch_size"] == 32 and row["momentum"] == 0.9
    assert row["lr_over_batch"] == pytest.approx(0.1 / 32)
    assert (row["break_even_step"], row["break_even_reason"], row["break_even_status"]) == (
        600,
        "early-peak",
        "confirmed",
    )
    assert row["lambda1_at_break_even"] == pytest.approx(12.0)
    assert row["peak_lambda1_h"] == pytest.approx(12.0)
    assert row["peak_lambda1_k"] == pytest.approx(6.0)
    after = [s for s in STEPS if s > 600]  # brute force, independent of the store
    assert row["mean_lambda1_h_after"] == pytest.approx(sum(map(sharpness, after)) / len(after))
    assert row["mean_lambda1_k_after"] == pytest.approx(
        sum(0.5 * sharpness(s) for s in after) / len(after)
    )
    assert row["mean_trace_k_after"] == pytest.approx(3.0 * row["mean_lambda1_h_after"])
    k = rd.break_even_k()
    assert k.series == "noise/lambda1_k" and k.step == 600 and k.confirmed


def test_no_break_even_yet_and_no_means() -> None:
    rd = store_of(messages(until=300)).runs["r"]  # still rising
    row = run_summary(rd)
    assert row["break_even_step"] is None and row["break_even_status"] == "none"
    assert math.isnan(row["mean_lambda1_h_after"]) and math.isnan(row["lambda1_at_break_even"])
    empty = store_of([messages()[0]]).runs["r"]
    assert empty.break_even() == derive.no_break_even()
    assert empty.break_even_k() == derive.no_break_even("noise/lambda1_k")


def test_adaptive_runs_use_the_preconditioned_sharpness() -> None:
    rd = store_of(messages(optimizer="Adam", precond=True)).runs["r"]
    be = rd.break_even()
    assert be.series == "sharpness/lambda1_precond"
    assert (be.step, be.reason, be.status) == (380, "threshold", "confirmed")  # 38 ≥ 0.95·38
    row = run_summary(rd)
    assert row["break_even_series"] == "sharpness/lambda1_precond"
    assert row["break_even_threshold"] == 38.0 and row["threshold"] == 40.0
    sgd = store_of(messages(run="s"))
    adam = store_of(messages(optimizer="Adam", precond=True))
    text = "\n".join(render(adam))  # the threshold and λ there are λ1(P⁻¹H)'s: marked
    assert "38ᴾ" in text and f"{row['lambda1_at_break_even']:.3g}ᴾ" in text
    assert "ᴾ" not in "\n".join(render(sgd)).split("break-even:")[0]
    which = dict(FIELDS)["λ1"]  # the compare table says per row which λ1 it is
    assert which(row, False) == "P⁻¹H" and which(row, True) == "P^-1H"
    assert which(run_summary(sgd.runs["s"]), False) == "H"
    assert dict(FIELDS)["λ1@BE"](row, False) == f"{row['lambda1_at_break_even']:.3g}"


def test_threshold_follows_a_schedule_published_on_change() -> None:
    rd = store_of(messages()).runs["r"]
    got = rd.aligned("sharpness/threshold", np.array([0, 20, 980, 1000, 2000]))
    assert got.tolist() == [20.0, 20.0, 20.0, 40.0, 40.0]
    assert np.isnan(rd.aligned("nope", np.array([0]))).all()


def test_live_replay_and_summary_agree(tmp_path: Path) -> None:
    msgs = messages()
    live = Store()
    for m in msgs:
        live.apply(m, now=0.0)
    path = tmp_path / "r.stiff"
    with SessionWriter(path) as w:
        for m in msgs:
            w.write(m)
    replay = store_of(list(SessionReader(path).messages()))
    assert live.runs["r"].break_even() == replay.runs["r"].break_even()
    row = summary_json(replay)[0]
    be = live.runs["r"].break_even()
    assert (row["break_even_step"], row["break_even_reason"], row["break_even_status"]) == (
        be.step,
        be.reason,
        be.status,
    )
    # a confirmed marker stays where it is while the run goes on
    partial = store_of(messages(until=1000)).runs["r"].break_even()
    assert partial.confirmed and partial == be


def test_json_carries_the_fields_and_null_for_nan() -> None:
    st = store_of(messages(), messages(run="q", until=300))
    rows = json.loads(json.dumps(summary_json(st)))
    for key in (
        "lr",
        "batch_size",
        "momentum",
        "lr_over_batch",
        "break_even_step",
        "break_even_reason",
        "break_even_status",
        "lambda1_at_break_even",
        "peak_lambda1_h",
        "peak_lambda1_k",
        "mean_lambda1_h_after",
        "mean_lambda1_k_after",
        "mean_trace_k_after",
        "catapults",
    ):
        assert key in rows[0] and key in rows[1]
    assert rows[1]["mean_lambda1_h_after"] is None and rows[1]["break_even_step"] is None


def render(st: Store, width: int = 80) -> list[str]:
    console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    console.print(summary_table(st))
    return console.export_text().splitlines()


def test_table_fits_80_columns_without_cutting_words() -> None:
    lam = np.concatenate([np.linspace(1, 8, 10), [16.0], np.full(20, 6.0)])
    catapult = [
        p.Hello(run="c", seq=0, step=0, t=0.0, name="sgd lr=0.2", optimizer={"lr": 0.2}),
        *(
            p.Scalars.from_dict(
                {"sharpness/lambda1_h": float(v), "sharpness/threshold": 10.0},
                run="c",
                seq=k + 1,
                step=20 * k,
                t=0.0,
            )
            for k, v in enumerate(lam)
        ),
    ]
    st = store_of(messages(), messages(run="q", until=300), messages(run="w", until=700), catapult)
    lines = render(st)
    assert max(cell_len(line) for line in lines) <= 80
    text = "\n".join(lines)
    assert "…" not in text
    words = ("sgd lr=0.1", "η/B", "break-", "even", "peak", "after", "Tr K", "no bye", "(crashed?)")
    for word in words:
        assert word in text
    assert "600ᵖ" in text  # confirmed early peak
    assert "none yet" in text  # still rising
    assert "200ᶜ" in text  # the catapult of the fourth run
    assert "◆ 600ᵖ" in text  # confirmed: the marks of stiffmon.marks
    assert re.search(r"◇ [0-9,]+ᵖ", text)  # the third run: candidate, not yet confirmed
    assert "tentative" in text and "catapult" in text  # the legend


def test_big_numbers_are_folded_not_cut_at_80_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three runs with preconditioned thresholds of 1e4 and λ1_K of 3e4 (an AdamW run and a
    diverged one): the break-even table was cut at its last column, its legend mid-word."""
    from stiffmon import summary

    rd = store_of(messages()).runs["r"]
    row = run_summary(rd) | {
        "break_even_step": None,
        "break_even_status": "none",
        "break_even_threshold": 12666.7,
        "break_even_series": "sharpness/lambda1_precond",
        "lambda1_at_break_even": 974.0,
        "peak_lambda1_h": 25.43,
        "peak_lambda1_k": 34931.0,
        "mean_lambda1_h_after": -1.234e-5,
        "mean_lambda1_k_after": 13.8,
        "mean_trace_k_after": 123456.0,
    }
    monkeypatch.setattr(summary, "run_summary", lambda rd: row)
    three = store_of(messages(), messages(run="q"), messages(run="w"))
    lines = render(three)
    text = "\n".join(lines)
    assert max(cell_len(line) for line in lines) <= 80
    for word in ("Tr K", "after", "1.27e4ᴾ", "3.49e4", "1.23e5", "(λ1(P⁻¹H))."):
        assert word in text, word
    assert "-1.23e" in text  # the widest number may fold (-1.23e / -5), never cut


def test_batch_size_from_the_per_step_scalar() -> None:
    store = Store()
    store.apply(p.Hello(run="r", seq=0, step=0, t=0.0, optimizer={"lr": 0.1}), replay=True)
    store.apply(
        p.Scalars.from_dict({"loss": 1.0, "batch_size": 50.0}, run="r", seq=1, step=0, t=0.0),
        replay=True,
    )
    store.apply(  # the last, smaller batch of an epoch
        p.Scalars.from_dict({"loss": 1.0, "batch_size": 7.0}, run="r", seq=2, step=1, t=0.0),
        replay=True,
    )
    row = run_summary(store.runs["r"])
    assert row["batch_size"] == 50 and row["lr_over_batch"] == 0.1 / 50
    store.apply(p.Hello(run="q", seq=0, step=0, t=0.0, batch_size=32), replay=True)
    store.apply(
        p.Scalars.from_dict({"loss": 1.0, "batch_size": 50.0}, run="q", seq=1, step=0, t=0.0),
        replay=True,
    )
    assert run_summary(store.runs["q"])["batch_size"] == 32  # the hello's, when given


def test_threshold_and_lr_at_an_early_break_even_under_a_schedule() -> None:
    """η decays from 0.1 to 0.01 after step 400 (thr 2/η: 20 → 200); λ1_H rides the edge of
    stability from step 180: the break-even is early, the last threshold ten times higher."""

    def lr(s: int) -> float:
        return 0.1 if s <= 400 else 0.1 - 0.09 * min(1.0, (s - 400) / 1000)

    msgs: list[p.Message] = [
        p.Hello(run="r", seq=0, step=0, t=0.0, optimizer={"type": "SGD", "lr": 0.1})
    ]
    for k, s in enumerate(range(0, 2001, 20)):
        thr = 2 / lr(s)
        vals = {
            "lr/0": lr(s),
            "sharpness/threshold": thr,
            "sharpness/lambda1_h": min(1 + 0.1 * s, thr),
        }
        msgs.append(p.Scalars.from_dict(vals, run="r", seq=k + 1, step=s, t=float(s)))
    rd = store_of(msgs).runs["r"]
    be = rd.break_even()
    assert (be.step, be.reason) == (180, "threshold")
    row = run_summary(rd)
    assert row["break_even_threshold"] == pytest.approx(20.0)  # not the last, 200
    assert row["lr_at_break_even"] == pytest.approx(0.1)
    assert row["threshold"] == pytest.approx(200.0) and row["lr"] == pytest.approx(0.01)
    text = "\n".join(render(store_of(msgs)))
    assert "last η" in text and "0.01" in text
    none_yet = run_summary(store_of(messages(until=300)).runs["r"])
    assert math.isnan(none_yet["break_even_threshold"]) and math.isnan(none_yet["lr_at_break_even"])


def scheduled(run: str, optimizer: dict[str, object], steps: int = 40) -> list[p.Message]:
    """A OneCycle-like run: η rises from 0.02 and β falls from the hello's 0.95 to 0.85 (for
    Adam the agent's ``momentum/0`` is β1 of ``betas``), as per-step columns."""
    hello = p.Hello(run=run, seq=0, step=0, t=0.0, name=run, optimizer=optimizer, batch_size=32)
    s = np.arange(steps, dtype=np.int64)
    cols = p.Columns(
        run=run,
        seq=1,
        step=steps - 1,
        t=float(steps),
        names=("loss", "lr/0", "momentum/0"),
        steps=s,
        times=s.astype(np.float64),
        values=(np.full(steps, 0.5), 0.02 + 0.01 * s, 0.95 - 0.1 * s / (steps - 1)),
    )
    return [hello, cols]


def test_momentum_is_the_last_steps_next_to_the_last_lr() -> None:
    """β is the per-step ``momentum/0`` at the step of "last η", not the hello's (which a
    scheduler that cycles momentum leaves behind); the hello's only without the column."""
    st = store_of(
        scheduled("sgd", {"type": "SGD", "lr": 0.02, "momentum": 0.95}),
        scheduled("adam", {"type": "AdamW", "lr": 0.02, "beta1": 0.95, "beta2": 0.999}),
        messages(run="plain"),  # no momentum/0: the hello's 0.9
    )
    rows = {r["run"]: r for r in summary_json(st)}
    for run in ("sgd", "adam"):
        assert rows[run]["lr"] == pytest.approx(0.41)
        assert rows[run]["momentum"] == pytest.approx(0.85)
    assert rows["plain"]["momentum"] == 0.9
    text = "\n".join(render(st))
    assert "0.41" in text and "0.85" in text and "0.95" not in text
    table = Console(width=150, file=io.StringIO(), record=True, color_system=None)
    table.print(compare_table([(r["name"], "red", r) for r in rows.values()], 150))
    line = next(ln for ln in table.export_text().splitlines() if ln.strip().startswith("sgd"))
    assert "0.41" in line and "0.85" in line and "0.95" not in line


def test_a_recording_still_being_written_is_not_called_crashed() -> None:
    """``stiffmon summary`` of a file whose writer runs on this machine: ``no bye yet``; its
    writer gone: ``no bye (writer pid N gone)``; another machine's: ``no bye (crashed?)``."""
    here, now = socket.gethostname(), time.time()
    cases = [
        (here, os.getpid(), f"no bye yet (writer pid {os.getpid()} still running)"),
        (here, dead_pid(), "no bye (writer pid {pid} gone)"),
        ("another-host", os.getpid(), "no bye (crashed?)"),
    ]
    for host, pid, words in cases:
        msgs = messages(until=300)
        hello = msgs[0]
        assert isinstance(hello, p.Hello)
        msgs[0] = dataclasses.replace(hello, host=host, pid=pid, t=now - 5.0)
        rd = store_of(msgs).runs["r"]
        assert run_status(rd) == words.format(pid=pid)
        assert run_summary(rd)["state"] == ("replay" if "yet" in words else "ended")
