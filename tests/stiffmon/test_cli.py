"""Tests for the ``stiffmon`` command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stiffmon import __version__
from stiffmon.cli import main

COMMANDS = ["watch", "replay", "record", "summary", "demo"]


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
    "argv",
    [
        ["watch"],
        ["replay", "x.stiff"],
        ["record", "tcp://127.0.0.1:1", "-o", "x"],
        ["summary", "x"],
    ],
)
def test_unbuilt_commands_exit_2_with_a_message(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "not available yet" in err and "Traceback" not in err


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
