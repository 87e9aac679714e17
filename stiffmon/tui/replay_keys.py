"""The keys that move through time: play / pause, step between measurements, jump to an end,
and a replay's speed (a mixin of :class:`~stiffmon.tui.app.StiffmonApp`, which holds the
attributes declared here)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from stiffmon.store import Store

if TYPE_CHECKING:
    from stiffmon.tui.sources import ReplaySource
    from stiffmon.tui.views import View

SPEEDS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, math.inf)
"""A replay's speeds (``+`` / ``-`` step through them; ∞: as fast as it reads)."""


class ReplayKeys:
    """``space``, ``,`` / ``.`` (scrub), ``Home`` / ``End`` and ``+`` / ``-``."""

    replay: ReplaySource | None
    store: Store
    paused: bool
    scrub: int | None
    view_name: str
    views: dict[str, View]

    if TYPE_CHECKING:  # the App's

        def redraw(self, force: bool = False) -> None: ...

        def notify(self, message: str) -> None: ...

    def action_pause(self) -> None:
        if self.replay is not None:
            if not self.replay.playing and self.replay.position >= len(self.replay.messages):
                self.replay.seek(self.store, 0)  # at the end: play from the start
            self.replay.playing = not self.replay.playing
        else:
            self.paused = not self.paused
        self.redraw(force=True)

    def action_scrub(self, direction: int) -> None:
        if self.replay is not None and self.view_name not in ("stiffness", "distance", "curvature"):
            self.replay.playing = False
            self.replay.step_measurement(self.store, direction)
        else:
            rd = self.views["stiffness"].selected_run()
            if rd is None:
                return
            if self.view_name == "curvature":  # the density measurements
                n = len(rd.curves.get("hessian-density", []))
            else:
                heavy = (*rd.matrices.items(), *rd.curves.items())
                n = max((len(v) for k, v in heavy if k != "hessian-density"), default=0)
            cur = n - 1 if self.scrub is None else self.scrub
            nxt = max(0, min(n - 1, cur + direction))
            self.scrub = None if nxt >= n - 1 else nxt
        self.redraw(force=True)

    def action_seek_end(self, end: int) -> None:
        if self.replay is not None:
            self.replay.playing = False
            self.replay.seek(self.store, len(self.replay.messages) if end else 0)
        self.scrub = None
        self.redraw(force=True)

    def action_speed(self, direction: int) -> None:
        replay = self.replay
        if replay is None:  # a key that does nothing says why
            self.notify("+ / - set a replay's speed; live runs show as they come (space pauses)")
            return

        def distance(j: int) -> float:
            a, b = SPEEDS[j], replay.speed
            if math.isfinite(a) and math.isfinite(b):
                return abs(math.log(a) - math.log(b))
            return 0.0 if a == b else 99.0

        i = min(range(len(SPEEDS)), key=distance)
        replay.speed = SPEEDS[max(0, min(len(SPEEDS) - 1, i + direction))]
        self.redraw(force=True)
