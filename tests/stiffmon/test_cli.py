"""Tests for the ``stiffmon`` command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stiffmon import __version__
from stiffmon import protocol as p
from stiffmon.cli import main
from stiffmon.session import SessionWriter

COMMANDS = ["watch", "replay", "record", "summary", "demo", "keys", "relay"]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"stiffmon {__version__}"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_on_each_command(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert f"usage: stiffmon {command}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["replay", "missing.stiff"], "no such session file"),
        (["demo", "--lrs", "fast,slow", "--no-tui"], "--lrs must be comma-separated numbers"),
        (["demo", "--steps", "0", "--no-tui"], "--steps must be at least 1"),
    ],
)
def test_commands_fail_clearly(
    argv: list[str], match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_watch_refuses_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "a.stiff"
    SessionWriter(path).close()
    assert main(["watch", str(path)]) == 2
    assert "stiffmon replay" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["nope"], ["watch", "--bogus-flag"], ["demo", "--runs", "x"]])
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: stiffmon" in capsys.readouterr().err


def test_console_script_runs_without_torch() -> None:
    code = (
        "import sys, runpy; sys.modules['torch'] = None; sys.argv = ['stiffmon', '--version'];"
        "runpy.run_module('stiffmon', run_name='__main__')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"stiffmon {__version__}"


def test_summary_of_a_session_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "a.stiff"
    with SessionWriter(path) as w:
        w.write(
            p.Hello(
                run="r",
                seq=0,
                step=0,
                t=0.0,
                name="sgd lr=0.1",
                optimizer={"lr": 0.1},
                batch_size=64,
            )
        )
        w.write(p.Scalars.from_dict({"loss": 0.5, "lr/0": 0.1}, run="r", seq=1, step=0, t=0.0))
        w.write(
            p.Scalars.from_dict(
                {"sharpness/lambda1_h": 30.0, "sharpness/threshold": 20.0},
                run="r",
                seq=2,
                step=7,
                t=1.0,
            )
        )
    with open(path, "ab") as f:
        f.write(b"torn")
    assert main(["summary", str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["name"] == "sgd lr=0.1" and rows[0]["break_even_step"] == 7
    assert rows[0]["lr_over_batch"] == pytest.approx(0.1 / 64) and rows[0]["final_loss"] == 0.5
    assert main(["summary", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the table may wrap at 80 columns
    assert "sgd" in out and "torn tail of 4 bytes" in out


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["summary", "nope.stiff"], "no such session file"),
        (["record", "tcp://nowhere", "-o", "x.stiff"], "not a tcp://host:port"),
        (["summary", "ssh://bad host"], "ssh to bad host failed"),
    ],
)
def test_bad_sources_are_clear_errors(
    argv: list[str], match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_summary_rejects_a_foreign_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "notes.stiff"
    bad.write_text("hello")
    assert main(["summary", str(bad)]) == 2
    assert "not a stiffmon session file" in capsys.readouterr().err


def test_keys_command(tmp_path: Path) -> None:
    assert main(["keys", str(tmp_path / "k"), "--clients", "laptop"]) == 0
    assert (tmp_path / "k" / "authorized" / "laptop.key").exists()
    assert (tmp_path / "k" / "server.key_secret").stat().st_mode & 0o077 == 0
