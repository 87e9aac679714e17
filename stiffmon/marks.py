"""Break-even marks: the one mapping from a marker's status to its symbol and ASCII fallback.

Every place that shows a break-even point uses it: the sharpness chart and its words, the
overview's sharpness chart, the compare table and ``stiffmon summary``. A catapult (a
one-measurement spike above the threshold) is not a status but has its mark here too.
"""

from __future__ import annotations

from typing import NamedTuple


class Mark(NamedTuple):
    """How one break-even status is shown."""

    symbol: str
    ascii: str
    words: str


BREAK_EVEN_MARKS: dict[str, Mark] = {
    "confirmed": Mark("◆", "*", "confirmed"),
    "tentative": Mark("◇", "o", "tentative"),
    "diverged": Mark("✕", "x", "diverged"),
    "none": Mark("·", ".", "none yet"),
}
"""Status → mark. ``diverged``: a tentative marker of a run that diverged, which no later
measurement will confirm; ``none``: no marker (yet)."""

CATAPULT = Mark("▲", "^", "catapult")

ASCII_MARKS: dict[str, str] = {m.symbol: m.ascii for m in (*BREAK_EVEN_MARKS.values(), CATAPULT)}
"""Each mark's symbol → its ASCII fallback (for the ASCII translation tables)."""


def mark_status(status: str, diverged: bool = False) -> str:
    """The status a marker is shown with: a ``tentative`` marker of a run that ``diverged``
    becomes ``diverged``; an unknown status counts as ``none``."""
    if status == "tentative" and diverged:
        return "diverged"
    return status if status in BREAK_EVEN_MARKS else "none"


def be_symbol(status: str, diverged: bool = False, ascii: bool = False) -> str:
    """The symbol of a break-even marker of ``status`` (see :func:`mark_status`)."""
    mark = BREAK_EVEN_MARKS[mark_status(status, diverged)]
    return mark.ascii if ascii else mark.symbol


def marks_legend(ascii: bool = False, none: bool = True, catapult: bool = True) -> str:
    """``◆ confirmed ◇ tentative ✕ diverged ▲ catapult · none yet`` (least needed last: cut
    first where the width ends)."""
    marks = [m for s, m in BREAK_EVEN_MARKS.items() if s != "none"]
    if catapult:
        marks.append(CATAPULT)
    if none:
        marks.append(BREAK_EVEN_MARKS["none"])
    return " ".join(f"{m.ascii if ascii else m.symbol} {m.words}" for m in marks)
