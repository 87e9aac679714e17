"""``--curve-keys`` / ``--curve-name`` that name no key pair: a one-line error, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from stiffmon.cli import main


def test_keys_clients_makes_one_pair_per_name(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    assert main(["keys", str(keys), "--clients", "laptop", "ci"]) == 0
    assert sorted(str(p.relative_to(keys)) for p in keys.rglob("*") if p.is_file()) == [
        "authorized/ci.key",
        "authorized/laptop.key",
        "ci.key",
        "ci.key_secret",
        "laptop.key",
        "laptop.key_secret",
        "server.key",
        "server.key_secret",
    ]


def test_an_unknown_curve_name_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    assert main(["keys", str(keys), "--clients", "laptop", "ci"]) == 0
    capsys.readouterr()
    argv = ["summary", "tcp://127.0.0.1:9", "--wait", "0.1", "--curve-keys", str(keys)]
    assert main([*argv, "--curve-name", "nobody"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"stiffmon summary: --curve-keys {keys}: ")
    assert "nobody.key_secret" in err and "client keys there: ci, laptop" in err
    assert len(err.splitlines()) == 1


def test_relay_without_keys_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["relay", "tcp://127.0.0.1:9", "--curve-keys", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"stiffmon relay: --curve-keys {empty}: ")
    assert "client keys there: none" in err
