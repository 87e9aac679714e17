"""A replay of several files of which some are not sessions opens the others and says so on
screen; given only files that are not sessions, ``stiffmon replay`` is still a clear error."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from stiffmon.cli import main
from stiffmon.tui.app import StiffmonApp
from stiffmon.tui.sources import ReplaySource
from tests.stiffmon.tui.fixtures import write_sessions
from tests.stiffmon.tui.test_app import screen_text


def bad_files(directory: Path) -> list[Path]:
    """An empty file (a recording killed before its header) and a foreign one."""
    empty, foreign = directory / "empty.stiff", directory / "notes.stiff"
    empty.write_bytes(b"")
    foreign.write_text("hello world, not a recording\n")
    return [empty, foreign]


def test_a_directory_with_bad_files_replays_the_good_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_sessions(tmp_path, lrs=(0.01, 0.2))
    bad_files(tmp_path)
    shots = tmp_path / "shots"
    assert main(["replay", str(tmp_path), "--screenshots", str(shots), "--size", "100x30"]) == 0
    err = capsys.readouterr().err
    assert "empty.stiff not opened: 0 bytes is too short" in err
    assert "notes.stiff not opened: not a stiffmon session file" in err
    assert (shots / "1-overview.svg").exists()


def test_only_bad_files_are_still_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty, _foreign = bad_files(tmp_path)
    assert main(["replay", str(empty), "--screenshots", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "0 bytes is too short" in err and "Traceback" not in err
    assert main(["replay", str(tmp_path), "--screenshots", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "0 bytes is too short" in err and "not a stiffmon session file" in err


async def test_the_screen_names_the_files_left_out(tmp_path: Path) -> None:
    paths = [*write_sessions(tmp_path, lrs=(0.01, 0.2)), *bad_files(tmp_path)]
    src = ReplaySource(paths, at_end=True)
    src.load()
    assert set(src.unopened) == set(paths[2:])
    app = StiffmonApp(replay=src, clock=lambda: 0.0, screenshot_dir=tmp_path)
    async with app.run_test(size=(160, 45)) as pilot:
        await pilot.pause()
        names = [n.message for n in app._notifications]
        assert any(m.startswith("empty.stiff not opened") for m in names)
        assert any(m.startswith("notes.stiff not opened") for m in names)
        text = screen_text(app)
        assert "sgd lr=0.01" in text and "sgd lr=0.2" in text  # the good runs are there
        assert "1 of 2 notes (g log): empty.stiff not opened" in text  # the status line
        app.clear_notifications()
        await pilot.press("g")
        await pilot.pause()
        text = screen_text(app)
        assert "not a stiffmon session file" in text and "0 bytes is too short" in text


def test_a_file_that_becomes_a_session_is_read_under_follow(tmp_path: Path) -> None:
    """Under ``--follow`` a file left out is tried again: a recording whose header was not
    written yet when the replay started is read once it is."""
    good, later = write_sessions(tmp_path, lrs=(0.01, 0.2))
    data = later.read_bytes()
    later.write_bytes(b"")
    src = ReplaySource([good, later], follow=True)
    src.load()
    assert list(src.unopened) == [later]
    n = len(src.messages)
    later.write_bytes(data)
    worker = threading.Thread(target=src.follow_loop, daemon=True)
    worker.start()
    deadline = time.monotonic() + 10
    while src.unopened and time.monotonic() < deadline:
        time.sleep(0.05)
    src.stop.set()
    worker.join(5)
    assert not src.unopened and not any("not opened" in note for note in src.notes)
    assert len(src.messages) > n
