"""Fixtures shared by the monitor's tests."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from stiffmon.tui.sources import LiveSource


@pytest.fixture
def live() -> Iterator[Callable[..., LiveSource]]:
    """Make :class:`~stiffmon.tui.sources.LiveSource` s running on threads of their own; each
    is stopped (and its thread joined) at teardown."""
    made: list[tuple[LiveSource, threading.Thread]] = []

    def make(*args: object, **kwargs: object) -> LiveSource:
        src = LiveSource(*args, **kwargs)  # type: ignore[arg-type]
        t = threading.Thread(target=src.run, daemon=True)
        t.start()
        made.append((src, t))
        return src

    yield make
    for src, t in made:
        src.stop.set()
        t.join(5)
