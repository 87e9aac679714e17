"""What the terminal can show, decided at start-up from the environment.

Terminals named ``vt100``, ``vt220``, ``linux`` (the Linux console), ``dumb``, ``ansi``… cannot
show braille or box-drawing characters: on them the monitor draws in ASCII, as with ``--ascii``.
``STIFFMON_ASCII=1`` / ``STIFFMON_ASCII=0`` says it outright (the flag ``--ascii`` still wins).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

ASCII_TERMS = frozenset(
    {"dumb", "vt52", "vt100", "vt102", "vt220", "vt320", "linux", "ansi", "cons25", "pcansi", "sun"}
)
"""``TERM`` names (before any ``-variant``) of terminals without Unicode line drawing."""

NO = frozenset({"0", "no", "false", "off"})


def ascii_terminal(environ: Mapping[str, str]) -> bool:
    """Whether the terminal described by ``environ`` needs ASCII drawing.

    ``STIFFMON_ASCII`` decides when set (``0``, ``no``, ``false``, ``off``: Unicode; anything
    else: ASCII); otherwise ``TERM``: its name before ``-`` (``vt100-am`` → ``vt100``) and after
    a ``.`` (tmux's ``screen.linux`` → ``linux``) in :data:`ASCII_TERMS`. No ``TERM``: Unicode.
    """
    forced = environ.get("STIFFMON_ASCII", "").strip().lower()
    if forced:
        return forced not in NO
    name = environ.get("TERM", "").strip().lower().split("-", 1)[0].rsplit(".", 1)[-1]
    return name in ASCII_TERMS


def ascii_mode(flag: bool, environ: Mapping[str, str] | None = None) -> bool:
    """ASCII drawing: asked for (``--ascii``), or the terminal needs it."""
    return flag or ascii_terminal(os.environ if environ is None else environ)
