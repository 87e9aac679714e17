"""``stiffmon export`` into a directory that holds an earlier export: refused unless ``--force``.

Before, a second export silently replaced the tables (and added a second event file per run for
TensorBoard, which then showed every run twice).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from stiffmon.cli import main
from stiffmon.export import SCHEMAS

from .test_export import read_csv, write_session


@pytest.fixture
def session(tmp_path: Path) -> Path:
    path = tmp_path / "a.stiff"
    write_session(path, "run-a", "sgd lr=0.1")
    return path


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_second_table_export_is_refused_and_writes_nothing(
    session: Path, tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if fmt == "parquet":
        pytest.importorskip("pyarrow", reason="needs pyarrow")
    out = tmp_path / "out"
    argv = ["export", str(session), "--format", fmt, "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    (out / f"runs.{fmt}").write_bytes(b"edited by hand")  # must survive the second export
    before = _snapshot(out)
    assert main(argv) == 2
    err = capsys.readouterr().err
    first = out / f"scalars.{fmt}"
    assert err.startswith(f"stiffmon export: {first} (and {len(SCHEMAS) - 1} more) already exists")
    assert "--force" in err and "nothing was written" in err
    assert _snapshot(out) == before


def test_one_existing_table_is_enough_to_refuse(
    session: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "events.csv").write_text("mine\n")
    (out / "notes.txt").write_text("not an export file\n")
    assert main(["export", str(session), "--out", str(out)]) == 2
    assert f"{out / 'events.csv'} already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["events.csv", "notes.txt"]
    assert (out / "events.csv").read_text() == "mine\n"


def test_force_replaces_the_earlier_tables(session: Path, tmp_path: Path) -> None:
    other = tmp_path / "b.stiff"
    write_session(other, "run-b", "adam", t0=5000.0)
    out = tmp_path / "out"
    assert main(["export", str(session), "--out", str(out)]) == 0
    assert main(["export", str(other), "--out", str(out), "--force"]) == 0
    assert {r["run"] for r in read_csv(out / "runs.csv")} == {"run-b"}
    assert {r["run"] for r in read_csv(out / "scalars.csv")} == {"run-b"}


def test_other_formats_and_other_files_do_not_conflict(session: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "README").write_text("mine")
    assert main(["export", str(session), "--format", "csv", "--out", str(out)]) == 0
    pytest.importorskip("pyarrow", reason="needs pyarrow")
    assert main(["export", str(session), "--format", "parquet", "--out", str(out)]) == 0
    assert (out / "README").read_text() == "mine"


def test_the_check_comes_before_listening_to_endpoints(
    session: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["export", str(session), "--out", str(out)]) == 0
    started = time.monotonic()
    argv = ["export", "tcp://127.0.0.1:9", "--out", str(out), "--wait", "30"]
    assert main(argv) == 2
    assert time.monotonic() - started < 10  # not after listening for --wait seconds
    assert "already exists" in capsys.readouterr().err


def test_tensorboard_refuses_a_second_event_file_per_run(
    session: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tensorboard", reason="needs tensorboard: pip install 'stiffmon[export]'")
    out = tmp_path / "tb"
    argv = ["export", str(session), "--format", "tensorboard", "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    (first,) = (out / "sgd_lr=0.1").glob("events.out.tfevents.*")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"stiffmon export: {first} already exists" in err and "--force" in err
    assert list((out / "sgd_lr=0.1").iterdir()) == [first]
    assert main([*argv, "--force"]) == 0
    (again,) = (out / "sgd_lr=0.1").glob("events.out.tfevents.*")  # the run once, not twice
    assert again != first


def test_tensorboard_writes_beside_other_runs(session: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="needs tensorboard: pip install 'stiffmon[export]'")
    out = tmp_path / "tb"
    other = tmp_path / "b.stiff"
    write_session(other, "run-b", "adam", t0=5000.0)
    assert main(["export", str(session), "--format", "tensorboard", "--out", str(out)]) == 0
    assert main(["export", str(other), "--format", "tensorboard", "--out", str(out)]) == 0
    assert sorted(d.name for d in out.iterdir()) == ["adam", "sgd_lr=0.1"]


def test_help_names_force(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "--force" in capsys.readouterr().out


def test_force_without_tensorboard_loses_nothing(
    session: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The earlier event files are removed only once the new ones can be written."""
    pytest.importorskip("tensorboard", reason="needs tensorboard: pip install 'stiffmon[export]'")
    out = tmp_path / "tb"
    argv = ["export", str(session), "--format", "tensorboard", "--out", str(out)]
    assert main(argv) == 0
    before = _snapshot(out)
    monkeypatch.setitem(sys.modules, "tensorboard.compat.proto", None)  # as if not installed
    assert main([*argv, "--force"]) == 2
    assert _snapshot(out) == before
