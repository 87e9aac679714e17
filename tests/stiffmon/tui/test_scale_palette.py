"""A 20-run sweep gets 20 colours that stay apart in a truecolor and a 256-colour terminal (the
palette had 10: each colour covered 2–3 runs of a 24-run sweep in every chart)."""

from __future__ import annotations

from rich.color import Color, ColorSystem

from stiffmon.store import Store
from stiffmon.tui.views.base import PALETTE, run_color


def test_twenty_distinct_colours_in_truecolor_and_256_colours() -> None:
    assert len(PALETTE) >= 20
    assert len({c.lower() for c in PALETTE}) == len(PALETTE)
    eight_bit = [Color.parse(c).downgrade(ColorSystem.EIGHT_BIT).number for c in PALETTE]
    assert len(set(eight_bit)) == len(PALETTE), eight_bit


def test_the_first_twenty_runs_each_get_their_own_colour() -> None:
    store = Store()
    runs = [store.run(f"lr={i}") for i in range(20)]
    assert len({run_color(rd) for rd in runs}) == 20
    assert run_color(runs[0]) == PALETTE[0]  # the first ten keep their colours
