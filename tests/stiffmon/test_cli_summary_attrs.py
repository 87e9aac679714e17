"""``stiffmon summary`` says how the sharpness threshold was set: the rule, the param group that
set it and whether the eigensolver converged (the ``hessian`` spectrum's attributes, which
``stiffmon export`` writes in its ``attrs`` column)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stiffmon import protocol as p
from stiffmon.cli import main
from stiffmon.session import SessionWriter

RULE = "(2+2β)/((1+2β)η) - wd (SGD, group 1)"
PRULE = "38/η (Adam, group 0)"


def _session(path: Path, *, attrs: bool = True, adam: bool = False) -> None:
    """Three λ1_H measurements; the second did not converge."""
    run = "adam" if adam else "sgd"
    seq = iter(range(1000))

    def kw(step: int) -> dict[str, object]:
        return {"run": run, "seq": next(seq), "step": step, "t": 1000.0 + step}

    with SessionWriter(path) as w:
        opt = {"type": "Adam" if adam else "SGD", "lr": 0.1}
        w.write(p.Hello(**kw(0), name=run, optimizer=opt, batch_size=8))
        for step, converged in ((0, True), (10, False), (20, True)):
            vals = {"loss": 1.0, "sharpness/lambda1_h": 5.0}
            if adam:
                vals["sharpness/lambda1_precond"] = 2.0
            w.write(p.Scalars.from_dict(vals, **kw(step)))
            a = {"hvps": 9, "converged": converged, "threshold_rule": RULE, "threshold_group": 1}
            w.write(p.Spectrum(**kw(step), name="hessian", values=np.array([5.0, 1.0]),
                               attrs=a if attrs else {}))  # fmt: skip
            if adam:
                b = {"converged": not converged, "threshold_rule": PRULE, "threshold_group": 0}
                w.write(p.Spectrum(**kw(step), name="hessian-precond", values=np.array([2.0]),
                                   attrs=b))  # fmt: skip
        w.write(p.Bye(**kw(20), reason="closed"))


def _json(path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    assert main(["summary", "--json", str(path)]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert isinstance(row, dict)
    return row


def test_summary_json_has_the_threshold_attributes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rec = tmp_path / "s.stiff"
    _session(rec)
    row = _json(rec, capsys)
    assert row["threshold_rule"] == RULE
    assert row["threshold_group"] == 1
    assert row["sharpness_converged"] is True  # the latest measurement's solve
    assert row["sharpness_unconverged"] == 1  # one of the three did not converge
    assert row["threshold_rule_precond"] is None  # not an adaptive run: nothing measured
    assert row["threshold_group_precond"] is None
    assert row["sharpness_precond_converged"] is None
    assert row["sharpness_precond_unconverged"] is None


def test_adaptive_runs_have_the_preconditioned_threshold_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rec = tmp_path / "a.stiff"
    _session(rec, adam=True)
    row = _json(rec, capsys)
    assert (row["threshold_rule"], row["threshold_group"]) == (RULE, 1)
    assert row["threshold_rule_precond"] == PRULE
    assert row["threshold_group_precond"] == 0
    assert row["sharpness_precond_converged"] is False
    assert row["sharpness_precond_unconverged"] == 2


def test_sessions_without_the_attributes_give_nulls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Recorded by an agent from before the attributes: null, not a guess."""
    rec = tmp_path / "old.stiff"
    _session(rec, attrs=False)
    row = _json(rec, capsys)
    for key in ("threshold_rule", "threshold_group", "sharpness_converged"):
        assert row[key] is None, key
    assert row["sharpness_unconverged"] is None


def test_the_table_says_the_rule_and_the_solver(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rec = tmp_path / "s.stiff"
    _session(rec)
    assert main(["summary", str(rec)]) == 0
    out = capsys.readouterr().out
    assert "(SGD, group 1)" in out
    assert "1 of 3 not converged" in out


def test_the_table_of_an_adaptive_run_gives_the_preconditioned_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its break-even is judged on λ1(P⁻¹H): the rule and solves of that threshold."""
    rec = tmp_path / "a.stiff"
    _session(rec, adam=True)
    assert main(["summary", str(rec)]) == 0
    out = capsys.readouterr().out
    assert PRULE in out and "(SGD, group 1)" not in out
    assert "ᴾ 2 of 3 not converged" in out
