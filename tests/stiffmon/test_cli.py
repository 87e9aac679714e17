"""Tests for the ``stiffmon`` command line."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stiffmon import __version__
from stiffmon import protocol as p
from stiffmon.cli import build_parser, main
from stiffmon.session import SessionWriter
from stiffmon.transport import free_port_pair

COMMANDS = ["watch", "replay", "record", "summary", "demo", "keys", "relay", "export", "serve"]


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


@pytest.mark.parametrize(
    ("argv", "suggestion"),
    [
        (["replay", "--speeed", "3", "x.stiff"], "--speed"),
        (["watch", "--sdfs"], None),
        (["record", "tcp://127.0.0.1:5999", "-o", "x.stiff", "--duraton", "2"], "--duration"),
        (["summary", "x.stiff", "--jsn"], "--json"),
        (["demo", "--stpes", "3"], "--steps"),
        (["keys", "k", "--froce"], "--force"),
        (["relay", "tcp://127.0.0.1:5999", "--bnid", "tcp://127.0.0.1:6000"], "--bind"),
        (["export", "x.stiff", "--out", "d", "--fromat=csv"], "--format"),
        (["serve", "--prot", "8001"], "--port"),
    ],
)
def test_an_unknown_flag_gets_the_commands_usage_and_a_close_match(
    argv: list[str], suggestion: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    command, flag = argv[0], [a for a in argv if a.startswith("--")][-1].split("=")[0]
    assert f"usage: stiffmon {command} " in err and "COMMAND ..." not in err
    assert f"stiffmon {command}: error: unrecognized arguments: {flag}" in err
    if suggestion is None:
        assert "did you mean" not in err
    else:
        assert f"(did you mean {suggestion}?)" in err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["replay", "--speed", "-1", "x.stiff"], "--speed"),
        (["replay", "--speed", "nan", "x.stiff"], "--speed"),
        (["replay", "--size", "0x36", "x.stiff", "--screenshots", "d"], "--size"),
        (["replay", "--size", "wide", "x.stiff", "--screenshots", "d"], "--size"),
        (["summary", "x.stiff", "--wait", "-3"], "--wait"),
        (["summary", "ssh://gpu", "--ssh-port", "0"], "--ssh-port"),
        (["record", "tcp://127.0.0.1:5999", "-o", "x.stiff", "--duration", "0"], "--duration"),
        (["record", "ssh://gpu", "-o", "x.stiff", "--ssh-port", "70000"], "--ssh-port"),
        (["export", "x.stiff", "--out", "d", "--wait", "-1"], "--wait"),
        (["serve", "--port", "99999"], "--port"),
        (["serve", "--port", "-1"], "--port"),
        (["serve", "--speed", "-2"], "--speed"),
        (["demo", "--steps", "0", "--no-tui"], "--steps"),
        (["demo", "--runs", "-1", "--no-tui"], "--runs"),
        (["demo", "--every", "0", "--no-tui"], "--every"),
        (["demo", "--batch-size", "-8", "--no-tui"], "--batch-size"),
        (["demo", "--momentum", "1.5", "--no-tui"], "--momentum"),
        (["demo", "--label-noise", "2", "--no-tui"], "--label-noise"),
    ],
)
def test_nonsense_numbers_are_usage_errors(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: stiffmon {argv[0]} " in err
    assert f"stiffmon {argv[0]}: error: argument {flag}: must " in err
    assert "Traceback" not in err


def test_numbers_at_their_limits_are_accepted() -> None:
    parser = build_parser()
    args = parser.parse_args(["replay", "x.stiff", "--speed", "0"])
    assert args.speed == 0.0 and args.size == (120, 36)  # 0: as fast as possible
    assert parser.parse_args(["replay", "x.stiff", "--size", "80X24"]).size == (80, 24)
    assert parser.parse_args(["serve", "--port", "0"]).port == 0  # any free port
    assert parser.parse_args(["serve", "--port", "65535", "--speed", "0"]).port == 65535
    assert parser.parse_args(["summary", "x.stiff", "--wait", "0"]).wait == 0.0
    args = parser.parse_args(["demo", "--batch-size", "0", "--momentum", "0.9", "--every", "1"])
    assert (args.batch_size, args.momentum, args.every) == (0, 0.9, 1)


@pytest.mark.parametrize(
    ("command", "says"),
    [
        ("record", ["ssh://[user@]host[:port]", "tcp://host:port", "default: until Ctrl+C"]),
        ("export", ["directory of them", "ssh://", "(default: csv)", "(default: 2.0)"]),
        ("summary", ["directory of them", "(default: 2.0)"]),
        ("serve", ["(default: 127.0.0.1)", "(default: 8000; 0: any free port)", "10.0"]),
        ("replay", ["--size COLSxROWS", "(default: 120x36)"]),
        ("demo", ["(default: mlp)", "(default: 64; 0: full-batch GD)", "(default: 20)"]),
    ],
)
def test_help_says_what_is_accepted_and_the_defaults(
    command: str, says: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps at the terminal width
    for text in says:
        assert text in out, text


def test_record_of_nothing_says_so_and_leaves_no_empty_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port_pair()}"
    out = tmp_path / "out.stiff"
    assert main(["record", endpoint, "-o", str(out), "--duration", "0.3"]) == 2
    err = capsys.readouterr().err
    assert f"stiffmon record: nothing received from {endpoint} in " in err
    assert f"{out} not created" in err and "Traceback" not in err
    assert not out.exists()
    _session(out, "earlier", "r1")  # an existing recording is kept as it was
    before = out.read_bytes()
    assert main(["record", endpoint, "-o", str(out), "--duration", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "nothing received" in err and f"{out} left as it was" in err
    assert out.read_bytes() == before
    empty = tmp_path / "empty.stiff"
    empty.touch()  # not even the file header is added
    assert main(["record", endpoint, "-o", str(empty), "--duration", "0.1"]) == 2
    assert f"{empty} left as it was" in capsys.readouterr().err and empty.stat().st_size == 0


@pytest.mark.parametrize(
    ("output", "says"),
    [
        ("{tmp}", "-o {tmp} is a directory: give a .stiff file to write"),
        ("{tmp}/no/out.stiff", "cannot write -o {tmp}/no/out.stiff: No such file or directory"),
    ],
)
def test_record_to_a_path_it_cannot_write_is_a_one_line_error(
    tmp_path: Path, output: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port_pair()}"
    argv = ["record", endpoint, "-o", output.format(tmp=tmp_path), "--duration", "0.1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"stiffmon record: {says.format(tmp=tmp_path)}\n")
    assert "Traceback" not in err


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


def test_keys_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "k"
    assert main(["keys", str(d)]) == 0
    secret = (d / "server.key_secret").read_bytes()
    assert main(["keys", str(d)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (d / "server.key_secret").read_bytes() == secret
    assert main(["keys", str(d), "--clients", "other"]) == 2  # the server key is there
    assert main(["keys", str(d), "--force"]) == 0
    assert (d / "server.key_secret").read_bytes() != secret


def _session(path: Path, name: str, run: str) -> None:
    with SessionWriter(path) as w:
        w.write(p.Hello(run=run, seq=0, step=0, t=0.0, name=name, optimizer={"lr": 0.1}))
        w.write(p.Scalars.from_dict({"loss": 0.5}, run=run, seq=1, step=0, t=0.0))


def test_summary_of_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _session(tmp_path / "a.stiff", "first", "r1")
    _session(tmp_path / "b.stiff", "second", "r2")
    (tmp_path / "notes.txt").write_text("not a session")
    assert main(["summary", f"{tmp_path}/", "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ["first", "second"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["summary", str(empty)]) == 2
    assert "no .stiff session files in the directory" in capsys.readouterr().err


def test_summary_of_a_dead_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port_pair()}"
    assert main(["summary", endpoint, "--wait", "0.3"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and f"no run answered on {endpoint} within 0.3 s" in err
    _session(tmp_path / "a.stiff", "first", "r1")
    empty = tmp_path / "empty.stiff"
    SessionWriter(empty).close()
    assert main(["summary", str(tmp_path / "a.stiff"), str(empty), "--json"]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out)[0]["name"] == "first" and "empty.stiff holds no run" in err


@pytest.mark.parametrize("command", [["watch"], ["replay", "{file}"], ["demo"]])
def test_monitor_without_a_terminal_exits_at_once(tmp_path: Path, command: list[str]) -> None:
    _session(tmp_path / "a.stiff", "first", "r1")
    argv = [c.format(file=tmp_path / "a.stiff") for c in command]
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "stiffmon", *argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2 and time.monotonic() - t0 < 30
    assert "needs a terminal" in out.stderr and "Traceback" not in out.stderr


def test_summary_json_into_a_closed_pipe(tmp_path: Path) -> None:
    for i in range(40):
        _session(tmp_path / f"r{i:02d}.stiff", f"run {i}", f"r{i}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "stiffmon", "summary", str(tmp_path), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # like `| head` that has already exited
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err


def test_demo_every_reaches_the_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    import stiffmon.demo as demo

    seen: dict[str, object] = {}

    def fake_run_demo(**kwargs: object) -> int:
        seen.update(kwargs)
        return 0

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert main(["demo", "--no-tui", "--every", "7"]) == 0
    assert seen["every"] == 7


def test_replay_plays_from_the_start_at_an_automatic_speed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stiffmon.tui.app as app_module

    path = tmp_path / "a.stiff"
    with SessionWriter(path) as w:
        w.write(p.Hello(run="r", seq=0, step=0, t=0.0, name="r"))
        w.write(p.Scalars.from_dict({"loss": 1.0}, run="r", seq=1, step=1, t=90.0))
    seen: list[object] = []

    class FakeApp:
        def __init__(self, **kwargs: object) -> None:
            seen.append(kwargs["replay"])

        def run(self) -> None:
            pass

    class Tty:
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(app_module, "StiffmonApp", FakeApp)
    monkeypatch.setattr(sys, "stdin", Tty())
    monkeypatch.setattr(sys, "stdout", Tty())
    assert main(["replay", str(tmp_path)]) == 0
    assert main(["replay", str(path), "--speed", "3"]) == 0
    auto, given = seen
    assert not auto.at_end and auto.speed == 5.0  # type: ignore[attr-defined]
    assert given.speed == 3.0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("argv", "runs", "lrs"),
    [
        (["--runs", "2"], 2, None),
        (["--lrs", "0.01,0.05,0.2"], None, "0.01,0.05,0.2"),
        (["--runs", "3", "--lrs", "0.01,0.05,0.2"], 3, "0.01,0.05,0.2"),
        ([], None, None),
    ],
)
def test_demo_runs_and_lrs_that_agree_reach_the_demo(
    argv: list[str], runs: int | None, lrs: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stiffmon.demo as demo

    seen: dict[str, object] = {}

    def fake_run_demo(**kwargs: object) -> int:
        seen.update(kwargs)
        return 0

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert main(["demo", "--no-tui", *argv]) == 0
    assert (seen["runs"], seen["lrs"]) == (runs, lrs)


@pytest.mark.parametrize(
    "argv",
    [["--runs", "2", "--lrs", "0.01,0.05,0.2"], ["--lrs", "0.1", "--runs", "3"]],
)
def test_demo_runs_and_lrs_that_disagree_are_a_usage_error(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import stiffmon.demo as demo

    def no_demo(**kwargs: object) -> int:
        raise AssertionError("the demo ran")

    monkeypatch.setattr(demo, "run_demo", no_demo)
    with pytest.raises(SystemExit) as info:
        main(["demo", "--no-tui", *argv, "--steps", "60", "--out", "unused"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: stiffmon demo" in err and "--runs" in err and "--lrs" in err


def test_demo_learning_rates_follow_runs_or_lrs() -> None:
    from stiffmon.demo import DEFAULT_LRS, DemoError, parse_lrs

    assert parse_lrs(None) == list(DEFAULT_LRS)
    assert parse_lrs(None, 2) == [0.01, 0.05]
    assert parse_lrs("0.1,0.2") == parse_lrs("0.1,0.2", 2) == [0.1, 0.2]
    with pytest.raises(DemoError, match="--runs 3 but --lrs gives 2"):
        parse_lrs("0.1,0.2", 3)
