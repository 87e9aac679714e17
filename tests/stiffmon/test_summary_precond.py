"""``stiffmon summary`` of an adaptive run gives the threshold its break-even is judged on: the
preconditioned sharpness's (``sharpness/threshold_precond``) and the peak of λ1(P⁻¹H), in
``--json`` and in the stability-threshold table; an AdamW run's ``threshold`` (λ1_H's) is null,
which was all it said before."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rich.cells import cell_len

from stiffmon import protocol as p
from stiffmon.cli import main
from stiffmon.session import SessionWriter

PRULE = "(2+2β1)/((1-β1)η) (AdamW, group 1)"
PRECOND = [50.0, 120.0, 203.0, 180.0]  # λ1(P⁻¹H) at steps 0, 10, 20, 30: below 1900


def _session(path: Path, *, adaptive: bool = True, attrs: bool = True) -> None:
    """Four measurements of an AdamW run that publishes only the preconditioned threshold
    (1900, once: it is published when it changes), or of an SGD run (threshold 20)."""
    run = "adamw" if adaptive else "sgd"
    seq = iter(range(1000))

    def kw(step: int) -> dict[str, object]:
        return {"run": run, "seq": next(seq), "step": step, "t": 1000.0 + step}

    with SessionWriter(path) as w:
        opt = {"type": "AdamW" if adaptive else "SGD", "lr": 0.003}
        w.write(p.Hello(**kw(0), name=run, optimizer=opt, batch_size=40))
        for k, lam in enumerate(PRECOND):
            step = 10 * k
            vals = {"loss": 1.0, "sharpness/lambda1_h": lam / 200}
            if adaptive:
                vals["sharpness/lambda1_precond"] = lam
                if k == 0:
                    vals["sharpness/threshold_precond"] = 1900.0
            elif k == 0:
                vals["sharpness/threshold"] = 20.0
            w.write(p.Scalars.from_dict(vals, **kw(step)))
            if adaptive and attrs:
                a = {"converged": True, "threshold_rule": PRULE, "threshold_group": 1}
                w.write(p.Spectrum(**kw(step), name="hessian-precond",
                                   values=np.array([lam]), attrs=a))  # fmt: skip
        w.write(p.Bye(**kw(30), reason="closed"))


def _json(path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    assert main(["summary", "--json", str(path)]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert isinstance(row, dict)
    return row


def _text(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["summary", str(path)]) == 0
    return capsys.readouterr().out


def test_json_has_the_preconditioned_threshold_and_peak(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rec = tmp_path / "adamw.stiff"
    _session(rec)
    row = _json(rec, capsys)
    assert row["break_even_series"] == "sharpness/lambda1_precond"
    assert row["threshold"] is None  # no λ1_H threshold for preconditioned steps
    assert row["threshold_precond"] == 1900.0
    assert row["peak_lambda1_precond"] == 203.0
    assert row["threshold_rule_precond"] == PRULE  # the rule of that threshold, beside it


def test_an_sgd_run_has_null_preconditioned_fields(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rec = tmp_path / "sgd.stiff"
    _session(rec, adaptive=False)
    row = _json(rec, capsys)
    assert row["threshold"] == 20.0
    assert row["threshold_precond"] is None and row["peak_lambda1_precond"] is None


def test_the_table_gives_the_threshold_the_break_even_is_judged_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The stability-threshold table: the last threshold and the peak λ1, marked ᴾ for
    λ1(P⁻¹H); within 80 columns."""
    rec = tmp_path / "adamw.stiff"
    _session(rec)
    out = _text(rec, capsys)
    table = out.rsplit("stability threshold", 1)[1]
    assert "1.9e3ᴾ" in table and "203ᴾ" in table and "AdamW" in table
    assert max(cell_len(line) for line in out.splitlines()) <= 80
    sgd = tmp_path / "sgd.stiff"
    _session(sgd, adaptive=False)
    table = _text(sgd, capsys).rsplit("stability threshold", 1)[1]
    row = next(line for line in table.splitlines() if "sgd" in line)
    assert row.split()[1:3] == ["20", "1.01"] and "ᴾ" not in row  # λ1_H's: 203 / 200


def test_a_threshold_without_solver_attributes_still_has_its_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Recorded by an agent from before the rule attributes: the threshold is still given."""
    rec = tmp_path / "old.stiff"
    _session(rec, attrs=False)
    out = _text(rec, capsys)
    assert "stability threshold" in out
    table = out.rsplit("stability threshold", 1)[1].splitlines()
    at = next(i for i, line in enumerate(table) if "adamw" in line)
    assert table[at].split()[1:] == ["1.9e3ᴾ", "203ᴾ", "—"]  # no rule said
    assert table[at + 1].split() == ["—"]  # nor the eigensolver
