"""``stiffmon export`` keeps every measurement's attributes: which param group set the
sharpness threshold, by which rule, and whether the solver converged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from stiffmon import protocol as p
from stiffmon.cli import main
from stiffmon.session import SessionWriter, read_session
from stiffmon_agent import Agent

from .test_export import read_csv


def _recording(path: Path) -> None:
    """Three SGD steps with two param groups (group 1 has the lower threshold)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": 0.01},
            {"params": model[2].parameters(), "lr": 0.5, "weight_decay": 0.1},
        ],
        lr=0.1,
        momentum=0.9,
    )
    x, y = torch.randn(16, 6), torch.arange(16) % 3
    agent = Agent(model, nn.CrossEntropyLoss(), opt, probe=(x, y), endpoint="", record=path,
                  registry=False, gram_every=1, sharpness_every=1, overhead_cap=None)  # fmt: skip
    for _ in range(3):
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        agent.step(loss, out, y)
    agent.close()


def test_spectrum_attributes_survive_the_csv_export(tmp_path: Path) -> None:
    rec = tmp_path / "r.stiff"
    _recording(rec)
    recorded = {
        (m.step, m.name): m.attrs for m in read_session(rec)[0] if isinstance(m, p.Spectrum)
    }
    hessian = [a for (_, name), a in recorded.items() if name == "hessian"]
    assert hessian and all(a["threshold_group"] == 1 for a in hessian)
    out = tmp_path / "csv"
    assert main(["export", str(rec), "--format", "csv", "--out", str(out)]) == 0
    rows = read_csv(out / "spectra.csv")
    assert rows
    for r in rows:  # every row carries its measurement's attributes, exactly as recorded
        assert json.loads(r["attrs"]) == recorded[(int(r["step"]), r["name"])]
    first = json.loads(next(r for r in rows if r["name"] == "hessian")["attrs"])
    assert first["threshold_group"] == 1
    assert "(SGD, group 1)" in first["threshold_rule"]
    assert isinstance(first["converged"], bool)
    assert {json.loads(r["attrs"])["n"] for r in rows if r["name"] == "grad-cov"} == {16}


def test_attributes_of_curves_matrices_and_events(tmp_path: Path) -> None:
    rec = tmp_path / "s.stiff"
    kw = {"run": "r", "step": 2, "t": 1000.0}
    with SessionWriter(rec) as w:
        w.write(p.Hello(run="r", seq=0, step=0, t=1000.0, name="n"))
        w.write(p.Curve(**kw, seq=1, name="stiffness-distance/input", x=np.array([0.1]),
                        y=np.array([0.5]), attrs={"xi": 0.25, "pairs": 3}))  # fmt: skip
        w.write(p.Matrix(**kw, seq=2, name="stiffness/cos/train-train", data=np.eye(2),
                         row_labels=("a", "b"), col_labels=("a", "b"),
                         attrs={"within": 0.5, "between": -0.25}))  # fmt: skip
        w.write(p.Event(**kw, seq=3, level="error", code="metric-error", message="m",
                        attrs={"metric": "gram"}))  # fmt: skip
        w.write(p.Spectrum(**kw, seq=4, name="hessian", values=np.array([2.0])))
    out = tmp_path / "csv"
    assert main(["export", str(rec), "--format", "csv", "--out", str(out)]) == 0
    (curve,) = read_csv(out / "curves.csv")
    assert json.loads(curve["attrs"]) == {"pairs": 3, "xi": 0.25}
    cells = read_csv(out / "matrices.csv")
    assert len(cells) == 4
    assert {c["attrs"] for c in cells} == {'{"between": -0.25, "within": 0.5}'}
    (ev,) = read_csv(out / "events.csv")
    assert json.loads(ev["attrs"]) == {"metric": "gram"}
    (sp,) = read_csv(out / "spectra.csv")
    assert sp["attrs"] == "{}"


def test_parquet_has_the_attrs_column(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet", reason="needs pyarrow")
    rec = tmp_path / "r.stiff"
    _recording(rec)
    assert main(["export", str(rec), "--format", "parquet", "--out", str(tmp_path / "p")]) == 0
    t = pq.read_table(tmp_path / "p" / "spectra.parquet")
    attrs = [json.loads(a) for a, n in zip(t.column("attrs").to_pylist(),
                                           t.column("name").to_pylist(), strict=True)
             if n == "hessian"]  # fmt: skip
    assert attrs and all(a["threshold_group"] == 1 and "converged" in a for a in attrs)
