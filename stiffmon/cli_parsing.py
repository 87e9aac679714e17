"""Argument types and the subcommand parser class of the ``stiffmon`` command line.

:mod:`stiffmon.cli` builds the parser from these: numbers checked against a range (a usage
error, exit status 2, otherwise), ``COLSxROWS`` sizes, and :class:`CommandParser`, whose unknown
arguments are its own usage error with a close match.
"""

from __future__ import annotations

import argparse
import difflib
import math
from collections.abc import Callable, Sequence


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: an unknown argument is its own usage error, with a close match.

    argparse leaves a subcommand's unknown arguments to the top-level parser, which prints its
    own usage (``stiffmon [-h] [--version] COMMAND ...``) and no hint.
    """

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """Parse like argparse, but exit with this command's usage on unknown arguments."""
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(self.unrecognized(extras))
        return parsed, extras

    def unrecognized(self, extras: Sequence[str]) -> str:
        """The error for unknown ``extras``, with the closest option of this command if any."""
        message = f"unrecognized arguments: {' '.join(extras)}"
        options = list(self._option_string_actions)
        for extra in extras:
            if extra.startswith("-"):
                close = difflib.get_close_matches(extra.split("=", 1)[0], options, n=1)
                if close:
                    return f"{message} (did you mean {close[0]}?)"
        return message


def number(
    cast: Callable[[str], float],
    low: float,
    high: float | None = None,
    *,
    above: bool = False,
    below: bool = False,
    note: str = "",
) -> Callable[[str], float]:
    """An argparse ``type``: a number from ``low`` to ``high``, else a usage error.

    Args:
        cast: ``int`` or ``float``.
        low: The smallest value allowed.
        high: The largest value allowed, if any.
        above: Whether ``low`` itself is refused.
        below: Whether ``high`` itself is refused.
        note: Said after the rule in the error, e.g. what 0 means.
    """
    rule = f"{'an integer' if cast is int else 'a number'} {'>' if above else '>='} {low:g}"
    if high is not None:
        rule += f" and {'<' if below else '<='} {high:g}"

    def parse(text: str) -> float:
        try:
            value = cast(text)
        except ValueError:
            value = math.nan
        too_low = value < low or (above and value == low)
        too_high = high is not None and (value > high or (below and value == high))
        if math.isnan(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {rule}{note}, got {text!r}")
        return value

    parse.__name__ = cast.__name__  # argparse names the type by it in some messages
    return parse


def screen_size(text: str) -> tuple[int, int]:
    """Parse ``COLSxROWS`` (e.g. ``120x36``) for ``replay --size``."""
    try:
        cols, rows = (int(v) for v in text.lower().split("x"))
    except ValueError:
        cols = rows = 0
    if cols < 1 or rows < 1:
        raise argparse.ArgumentTypeError(f"must look like 120x36 (COLSxROWS), got {text!r}")
    return cols, rows


PORT = number(int, 0, 65535, note=" (0: any free port)")
SPEED = number(float, 0, note=" (0: as fast as possible)")
SSH_PORT = number(int, 1, 65535)
SECONDS = number(float, 0)
COUNT = number(int, 1)
MOMENTUM = number(float, 0, 1, below=True)
