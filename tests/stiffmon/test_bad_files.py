"""A folder with one bad file in it (empty, cut before its header, foreign): ``summary`` and
``export`` use the good files and name each bad one with why, as ``replay`` does, and their exit
status says that something was left out; ``replay`` opens each file once."""

from __future__ import annotations

import csv
import errno
import json
from pathlib import Path
from typing import Any

import pytest

from stiffmon.cli import main
from stiffmon.session import SessionReader
from tests.stiffmon.tui.fixtures import write_sessions

BAD = {
    "empty.stiff": ("", "0 bytes is too short"),
    "torn.stiff": ("cut", "7 bytes is too short"),
    "foreign.stiff": ("hello, this is not a session at all\n", "not a stiffmon session file"),
}


def folder(tmp_path: Path) -> Path:
    """Two good sessions (lr 0.01, 0.2) and the three bad files of :data:`BAD`."""
    d = tmp_path / "runs"
    d.mkdir()
    good = write_sessions(d, lrs=(0.01, 0.2))
    for name, (text, _) in BAD.items():
        data = good[0].read_bytes()[:7] if text == "cut" else text.encode()
        (d / name).write_bytes(data)
    return d


def said_bad(err: str, command: str) -> None:
    for name, (_, why) in BAD.items():
        line = next((ln for ln in err.splitlines() if name in ln), "")
        assert line.startswith(f"stiffmon {command}: ") and why in line, (name, err)


def test_summary_summarises_the_good_files(tmp_path: Path, capsys: Any) -> None:
    d = folder(tmp_path)
    assert main(["summary", str(d)]) == 1
    out, err = capsys.readouterr()
    assert "sgd lr=0.01" in out and "sgd lr=0.2" in out
    said_bad(err, "summary")
    assert "Traceback" not in err


def test_summary_json_stays_json(tmp_path: Path, capsys: Any) -> None:
    d = folder(tmp_path)
    assert main(["summary", "--json", str(d)]) == 1
    out, err = capsys.readouterr()
    assert sorted(r["name"] for r in json.loads(out)) == ["sgd lr=0.01", "sgd lr=0.2"]
    said_bad(err, "summary")


def test_summary_of_no_session_is_status_2(tmp_path: Path, capsys: Any) -> None:
    d = folder(tmp_path)
    assert main(["summary", *(str(d / n) for n in BAD)]) == 2
    said_bad(capsys.readouterr().err, "summary")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export_writes_the_good_files_and_fails(tmp_path: Path, capsys: Any, fmt: str) -> None:
    d, out = folder(tmp_path), tmp_path / "out"
    assert main(["export", str(d), "--format", fmt, "--out", str(out)]) == 1
    stdout, err = capsys.readouterr()
    said_bad(err, "export")
    assert "3 files left out as not sessions" in err
    assert f"scalars.{fmt}" in stdout
    if fmt == "csv":
        with (out / "runs.csv").open() as f:
            names = sorted(row["name"] for row in csv.DictReader(f))
        assert names == ["sgd lr=0.01", "sgd lr=0.2"]


def test_export_of_no_session_writes_nothing(tmp_path: Path, capsys: Any) -> None:
    d, out = folder(tmp_path), tmp_path / "out"
    assert main(["export", *(str(d / n) for n in BAD), "--out", str(out)]) == 2
    said_bad(capsys.readouterr().err, "export")
    assert not out.exists() or not any(out.iterdir())


def test_replay_opens_each_file_once(
    tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each file is opened once (not once to check and once to read), and every ``OSError``
    on opening one (here EIO) leaves that file out with why, as a ``PermissionError`` does."""
    d = folder(tmp_path)
    broken = d / "broken.stiff"
    broken.write_bytes((d / "lr0.01.stiff").read_bytes())
    opened: list[Path] = []
    init = SessionReader.__init__

    def counting(self: SessionReader, path: Any, *args: Any, **kwargs: Any) -> None:
        opened.append(Path(path))
        if Path(path) == broken:
            raise OSError(errno.EIO, "Input/output error", str(path))
        init(self, path, *args, **kwargs)

    monkeypatch.setattr(SessionReader, "__init__", counting)
    files = sorted(d.glob("*.stiff"))
    assert main(["replay", str(d)]) == 2  # pytest's stdout is no terminal
    err = capsys.readouterr().err
    assert "needs a terminal" in err and "Traceback" not in err
    assert sorted(opened) == files  # each once
    opened.clear()
    assert main(["replay", str(broken)]) == 2
    assert opened == [broken]
    assert f"{broken}: Input/output error" in capsys.readouterr().err
