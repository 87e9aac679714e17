"""``stiffmon export``: tidy tables (CSV, Parquet) and TensorBoard event files read back."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pytest

from stiffmon import protocol as p
from stiffmon.cli import main
from stiffmon.export import SCHEMAS
from stiffmon.export_tensorboard import heatmap, png
from stiffmon.session import SessionWriter

LOSSES = {0: 2.0, 1: 1.5, 2: 1.25, 3: 1.0, 4: 0.75}
MATRIX = np.array([[1.0, -0.5], [0.25, math.nan]])


def write_session(path: Path, run: str, name: str, t0: float = 1000.0) -> None:
    """A small session with one message of every kind; values known in closed form."""
    seq = iter(range(1000))

    def kw(step: int) -> dict[str, object]:
        return {"run": run, "seq": next(seq), "step": step, "t": t0 + step}

    with SessionWriter(path) as w:
        w.write(p.Hello(**kw(0), name=name, optimizer={"type": "SGD", "lr": 0.1}, batch_size=8,
                        class_names=("cat", "dog")))  # fmt: skip
        for step, loss in LOSSES.items():
            w.write(p.Scalars.from_dict({"loss": loss, "lr/0": 0.1}, **kw(step)))
        for step in (0, 3):
            w.write(p.Scalars.from_dict(
                {"sharpness/lambda1_h": 10.0 + step, "sharpness/threshold": math.nan}, **kw(step)
            ))  # fmt: skip
            w.write(p.Matrix(**kw(step), name="stiffness/cos/train-train", data=MATRIX + step,
                             row_labels=("cat", "dog"), col_labels=("cat", "dog")))  # fmt: skip
            w.write(p.Curve(**kw(step), name="stiffness-distance/input",
                            x=np.array([0.1, 0.3]), y=np.array([0.5, -0.2 * step])))  # fmt: skip
            w.write(
                p.Spectrum(
                    **kw(step), name="hessian", values=np.array([3.0, 2.0, 1.0]) * (step + 1)
                )
            )
        w.write(p.Event(**kw(4), level="warning", code="nan-loss", message="a NaN, with, commas"))
        w.write(p.Bye(**kw(4), reason="closed"))


@pytest.fixture
def sessions(tmp_path: Path) -> list[Path]:
    a, b = tmp_path / "a.stiff", tmp_path / "b.stiff"
    write_session(a, "run-a", "sgd lr=0.1")
    write_session(b, "run-b", "sgd lr=0.1", t0=2000.0)  # same name: directories get the run id
    return [a, b]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_csv_tables(sessions: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "csv"
    assert main(["export", *map(str, sessions), "--format", "csv", "--out", str(out)]) == 0
    for table, cols in SCHEMAS.items():
        with (out / f"{table}.csv").open() as f:
            assert next(csv.reader(f)) == list(cols)
    rows = read_csv(out / "scalars.csv")
    assert len(rows) == 2 * (2 * len(LOSSES) + 2 * 2)  # every per-step and heavy scalar, 2 runs
    loss = {(r["run"], int(r["step"])): float(r["value"]) for r in rows if r["name"] == "loss"}
    assert loss == {(run, s): v for run in ("run-a", "run-b") for s, v in LOSSES.items()}
    lam = [r for r in rows if r["run"] == "run-b" and r["name"] == "sharpness/lambda1_h"]
    assert [(int(r["step"]), float(r["time"]), float(r["value"])) for r in lam] == [
        (0, 2000.0, 10.0),
        (3, 2003.0, 13.0),
    ]
    assert {r["value"] for r in rows if r["name"] == "sharpness/threshold"} == {""}  # NaN: empty

    cells = [r for r in read_csv(out / "matrices.csv") if r["run"] == "run-a" and r["step"] == "3"]
    assert len(cells) == 4
    got = {(int(r["row"]), int(r["col"])): r["value"] for r in cells}
    assert got == {(0, 0): "4.0", (0, 1): "2.5", (1, 0): "3.25", (1, 1): ""}
    assert {(r["row_label"], r["col_label"]) for r in cells} == {
        ("cat", "cat"), ("cat", "dog"), ("dog", "cat"), ("dog", "dog")
    }  # fmt: skip
    curves = [r for r in read_csv(out / "curves.csv") if r["run"] == "run-a" and r["step"] == "3"]
    assert [(r["index"], float(r["x"]), float(r["y"])) for r in curves] == [
        ("0", 0.1, 0.5),
        ("1", 0.3, pytest.approx(-0.6)),
    ]
    spectra = [r for r in read_csv(out / "spectra.csv") if r["run"] == "run-b" and r["step"] == "3"]
    assert [(int(r["rank"]), float(r["value"])) for r in spectra] == [(0, 12.0), (1, 8.0), (2, 4.0)]
    (ev, _) = read_csv(out / "events.csv")
    assert ev["message"] == "a NaN, with, commas" and ev["level"] == "warning"
    runs = read_csv(out / "runs.csv")
    assert [(r["run"], r["name"], r["lr"], r["batch_size"]) for r in runs] == [
        ("run-a", "sgd lr=0.1", "0.1", "8"),
        ("run-b", "sgd lr=0.1", "0.1", "8"),
    ]


def test_parquet_equals_csv(sessions: list[Path], tmp_path: Path) -> None:
    pq = pytest.importorskip(
        "pyarrow.parquet", reason="needs pyarrow: pip install 'stiffmon[export]'"
    )
    src = list(map(str, sessions))
    assert main(["export", *src, "--format", "csv", "--out", str(tmp_path / "c")]) == 0
    assert main(["export", *src, "--format", "parquet", "--out", str(tmp_path / "p")]) == 0
    for table, cols in SCHEMAS.items():
        t = pq.read_table(tmp_path / "p" / f"{table}.parquet")
        assert t.column_names == list(cols)
        rows = read_csv(tmp_path / "c" / f"{table}.csv")
        assert t.num_rows == len(rows)
        for c in cols:
            pv = t.column(c).to_pylist()
            cv = [r[c] for r in rows]
            for a, b in zip(pv, cv, strict=True):
                if a is None or (isinstance(a, float) and math.isnan(a)):
                    assert b == ""
                elif isinstance(a, float):
                    assert a == float(b)
                else:
                    assert str(a) == b
    assert pq.read_table(tmp_path / "p" / "scalars.parquet").schema.field("step").type == "int64"


def test_tensorboard_event_files_read_back(sessions: list[Path], tmp_path: Path) -> None:
    ea_mod = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="needs tensorboard: pip install 'stiffmon[export]'",
    )
    image_mod = pytest.importorskip("PIL.Image")
    out = tmp_path / "tb"
    assert main(["export", *map(str, sessions), "--format", "tensorboard", "--out", str(out)]) == 0
    dirs = sorted(d.name for d in out.iterdir())
    assert dirs == ["sgd_lr=0.1-run-a", "sgd_lr=0.1-run-b"]
    acc = ea_mod.EventAccumulator(str(out / dirs[0]), size_guidance={"scalars": 0, "images": 0,
                                                                     "histograms": 0})  # fmt: skip
    acc.Reload()
    tags = acc.Tags()
    assert set(tags["scalars"]) == {"loss", "lr/0", "sharpness/lambda1_h", "sharpness/threshold"}
    loss = acc.Scalars("loss")
    assert [(e.step, e.wall_time, e.value) for e in loss] == [
        (s, 1000.0 + s, pytest.approx(v)) for s, v in LOSSES.items()
    ]
    assert [e.value for e in acc.Scalars("sharpness/lambda1_h")] == [10.0, 13.0]

    assert tags["images"] == ["stiffness/cos/train-train"]
    imgs = acc.Images("stiffness/cos/train-train")
    assert [e.step for e in imgs] == [0, 3]
    img = np.asarray(image_mod.open(io.BytesIO(imgs[0].encoded_image_string)).convert("RGB"))
    assert img.shape == (32, 32, 3) and (imgs[0].width, imgs[0].height) == (32, 32)
    centre = img[8::16, 8::16]  # one pixel per cell
    np.testing.assert_array_equal(centre[0, 0], [178, 24, 43])  # +1: red
    np.testing.assert_array_equal(
        centre[0, 1], np.round(255 - 0.5 * (255 - np.array([33, 102, 172])))
    )
    np.testing.assert_array_equal(centre[1, 1], [128, 128, 128])  # NaN: grey

    assert tags["histograms"] == ["spectrum/hessian"]
    (h0, h3) = acc.Histograms("spectrum/hessian")
    assert (h3.step, h3.histogram_value.min, h3.histogram_value.max) == (3, 4.0, 12.0)
    assert (h3.histogram_value.num, h3.histogram_value.sum) == (3, 24.0)
    assert sum(h0.histogram_value.bucket) == 3


def test_png_is_a_valid_image() -> None:
    image_mod = pytest.importorskip("PIL.Image")
    rgb = heatmap(np.array([[0.0, 2.0], [-4.0, 1.0]]), cell=3)
    assert rgb.shape == (6, 6, 3)
    back = np.asarray(image_mod.open(io.BytesIO(png(rgb))).convert("RGB"))
    np.testing.assert_array_equal(back, rgb)
    assert back[0, 0].tolist() == [255, 255, 255] and back[3, 0].tolist() == [33, 102, 172]


def test_export_of_a_live_run_equals_its_recording(tmp_path: Path, endpoint: str) -> None:
    torch = pytest.importorskip("torch")
    from stiffmon_agent import Agent

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(12, 4), torch.arange(12) % 3
    record = tmp_path / "live.stiff"
    agent = Agent(model, torch.nn.CrossEntropyLoss(), opt, probe=(x, y), endpoint=endpoint,
                  record=record, registry=False, gram_every=2, sharpness_every=2,
                  overhead_cap=None)  # fmt: skip
    try:
        for _ in range(5):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            agent.step(loss)
        live = tmp_path / "live"
        assert main(["export", endpoint, "--format", "csv", "--out", str(live), "--wait", "3"]) == 0
    finally:
        agent.close()
    assert main(["export", str(record), "--format", "csv", "--out", str(tmp_path / "f")]) == 0
    for table in ("scalars", "matrices", "spectra", "curves"):
        got, want = read_csv(live / f"{table}.csv"), read_csv(tmp_path / "f" / f"{table}.csv")
        assert got == want and want, table


def test_export_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path / "nope.stiff"), "--out", str(tmp_path)]) == 2
    assert "no such session file" in capsys.readouterr().err
    empty = tmp_path / "empty.stiff"
    SessionWriter(empty).close()
    assert main(["export", str(empty), "--out", str(tmp_path / "o")]) == 1
    assert "no run found" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["csv", "tensorboard"])
def test_export_into_an_existing_file_is_a_clear_error(
    sessions: list[Path], tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    argv = ["export", str(sessions[0]), "--format", fmt]
    assert main([*argv, "--out", str(taken)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"stiffmon export: --out {taken} exists and is not a directory: give a directory to "
        "write into (it is made if missing)\n"
    )
    assert taken.read_text() == "keep me"  # loses nothing
    assert main([*argv, "--out", str(taken / "sub")]) == 2  # under a file: one line too
    err = capsys.readouterr().err
    assert err == f"stiffmon export: cannot write into --out {taken / 'sub'}: Not a directory\n"


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["export", "--help"])
    assert info.value.code == 0
    assert "--format {csv,parquet,tensorboard}" in capsys.readouterr().out
