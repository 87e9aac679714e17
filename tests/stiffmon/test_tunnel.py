"""ssh:// addresses: parsing, and that nothing in them reaches ssh as an option."""

from __future__ import annotations

from pathlib import Path

import pytest

from stiffmon.tunnel import Tunnel, TunnelError, parse_ssh


def test_parse_ssh() -> None:
    t = parse_ssh("ssh://alice@gpu-box:6000")
    assert (t.user, t.host, t.port, t.destination) == ("alice", "gpu-box", 6000, "alice@gpu-box")
    assert parse_ssh("ssh://gpu-box").port == 5555


@pytest.mark.parametrize(
    "url",
    [
        "ssh://-oProxyCommand=touch_pwned",
        "ssh://-oProxyCommand=sh -c x:5555",
        "ssh://-x@host",
        "ssh://host:70000",
        "tcp://host:1",
    ],
)
def test_option_like_or_bad_addresses_are_refused(url: str) -> None:
    with pytest.raises(TunnelError):
        parse_ssh(url)


def test_destination_comes_after_a_double_dash(tmp_path: Path) -> None:
    argv_file = tmp_path / "argv"
    fake = tmp_path / "fake-ssh"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {argv_file}\necho nope >&2\nexit 255\n')
    fake.chmod(0o755)
    with pytest.raises(TunnelError, match="nope"):
        Tunnel("ssh://bob@example.org:7000", ssh=str(fake), extra_args=("-v",), timeout=5)
    argv = argv_file.read_text().splitlines()
    assert argv[-2:] == ["--", "bob@example.org"]
    assert "127.0.0.1:7000" in " ".join(argv) and "-N" in argv
