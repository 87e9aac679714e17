"""The README documents every option of every ``stiffmon`` command (``--help`` has them all)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from stiffmon.cli import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def _options() -> list[tuple[str, str]]:
    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [
        (name, option)
        for name, command in sub.choices.items()
        for action in command._actions
        for option in action.option_strings
        if option not in ("-h", "--help")
    ]


def test_every_option_is_in_the_readme() -> None:
    text = README.read_text(encoding="utf-8")
    missing = [
        f"stiffmon {name} {option}"
        for name, option in _options()
        if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text)
    ]
    assert not missing, f"not in README.md: {', '.join(missing)}"


def test_the_registry_variables_are_in_the_readme() -> None:
    text = README.read_text(encoding="utf-8")
    for variable in ("STIFFMON_REGISTRY", "XDG_CACHE_HOME"):
        assert f"${variable}" in text, variable
