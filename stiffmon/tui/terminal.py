"""What the terminal can show, decided at start-up from the environment.

Terminals named ``vt100``, ``vt220``, ``linux`` (the Linux console), ``dumb``, ``ansi``… cannot
show braille or box-drawing characters: on them the monitor draws in ASCII, as with ``--ascii``.
So does a locale that is not UTF-8 (``LANG=C``, ``LC_ALL=POSIX``, ``en_US.ISO-8859-1``: tmux and
screen started there show ``_`` or mojibake for every braille dot and box line).
``STIFFMON_ASCII=1`` / ``STIFFMON_ASCII=0`` says it outright (the flag ``--ascii`` still wins).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

ASCII_TERMS = frozenset(
    {"dumb", "vt52", "vt100", "vt102", "vt220", "vt320", "linux", "ansi", "cons25", "pcansi", "sun"}
)
"""``TERM`` names (before any ``-variant``) of terminals without Unicode line drawing."""

NO = frozenset({"0", "no", "false", "off"})

C_LOCALES = frozenset({"c", "posix"})
"""Locales whose character set is ASCII."""

COERCED = frozenset({"C.UTF-8", "C.utf8", "UTF-8"})
"""What Python (PEP 538) sets ``LC_CTYPE`` to when it starts in the C locale."""


def python_coerced_c_locale() -> bool:
    """Whether this interpreter started in the C / POSIX locale (PEP 538 / 540: Python then
    runs in UTF-8 mode and writes ``LC_CTYPE=C.UTF-8`` into ``os.environ``, hiding ``LANG=C``)."""
    return bool(sys.flags.utf8_mode) and not os.environ.get("PYTHONUTF8")


def locale_is_ascii(environ: Mapping[str, str], coerced: bool = False) -> bool:
    """Whether the locale of ``environ`` says the terminal cannot take UTF-8.

    The locale is the first of ``LC_ALL``, ``LC_CTYPE``, ``LANG`` that is set (``LC_CTYPE``
    skipped where ``coerced``: Python put it there, :func:`python_coerced_c_locale`). ASCII:
    ``C`` or ``POSIX``, or a codeset other than UTF-8 (``de_DE.ISO-8859-1``). No locale at all,
    or one without a codeset (``en_US``), says nothing: Unicode.
    """
    names = ("LC_ALL", "LANG") if coerced and environ.get("LC_CTYPE") in COERCED else None
    for key in names or ("LC_ALL", "LC_CTYPE", "LANG"):
        value = environ.get(key, "").strip()
        if value:
            break
    else:
        return False
    if value.lower() in C_LOCALES:
        return True
    codeset = value.partition(".")[2].partition("@")[0].lower().replace("-", "").replace("_", "")
    return bool(codeset) and codeset != "utf8"


def ascii_terminal(environ: Mapping[str, str], coerced: bool | None = None) -> bool:
    """Whether the terminal described by ``environ`` needs ASCII drawing.

    ``STIFFMON_ASCII`` decides when set (``0``, ``no``, ``false``, ``off``: Unicode; anything
    else: ASCII); otherwise ``TERM``: its name before ``-`` (``vt100-am`` → ``vt100``) and after
    a ``.`` (tmux's ``screen.linux`` → ``linux``) in :data:`ASCII_TERMS`, or a locale that is
    not UTF-8 (:func:`locale_is_ascii`; ``coerced`` default: this interpreter's,
    :func:`python_coerced_c_locale`). No ``TERM`` and no locale: Unicode.
    """
    forced = environ.get("STIFFMON_ASCII", "").strip().lower()
    if forced:
        return forced not in NO
    name = environ.get("TERM", "").strip().lower().split("-", 1)[0].rsplit(".", 1)[-1]
    if coerced is None:
        coerced = python_coerced_c_locale()
    return name in ASCII_TERMS or locale_is_ascii(environ, coerced)


def ascii_mode(flag: bool, environ: Mapping[str, str] | None = None) -> bool:
    """ASCII drawing: asked for (``--ascii``), or the terminal needs it."""
    return flag or ascii_terminal(os.environ if environ is None else environ)
