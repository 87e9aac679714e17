"""The monitor's tests draw as on a common terminal, whatever terminal runs them."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _unicode_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """``TERM=xterm-256color`` and no ``STIFFMON_ASCII``: the app decides ASCII from them
    (:mod:`stiffmon.tui.terminal`), so a ``TERM=dumb`` CI shell would change every screen."""
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("STIFFMON_ASCII", raising=False)
