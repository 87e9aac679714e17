"""The monitor's tests draw as on a common terminal, whatever terminal runs them."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _unicode_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """``TERM=xterm-256color``, a UTF-8 locale and no ``STIFFMON_ASCII``: the app decides ASCII
    from them (:mod:`stiffmon.tui.terminal`), so a ``TERM=dumb`` or ``LANG=C`` CI shell would
    change every screen."""
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("STIFFMON_ASCII", raising=False)
    monkeypatch.setenv("LANG", "C.UTF-8")
    monkeypatch.delenv("LC_ALL", raising=False)
    monkeypatch.delenv("LC_CTYPE", raising=False)
