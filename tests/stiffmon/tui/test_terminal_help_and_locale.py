"""Terminals unlike the developers': a C locale (no UTF-8), ASCII terminals and narrow windows,
for the help screen and the choice of ASCII drawing."""

from __future__ import annotations

from pathlib import Path

import pytest

from stiffmon.tui.help import KEY_NAMES
from stiffmon.tui.terminal import ascii_terminal, locale_is_ascii
from tests.stiffmon.tui.test_app import replay_app


@pytest.mark.parametrize(
    ("environ", "coerced", "ascii"),
    [
        ({"LANG": "C"}, False, True),
        ({"LC_ALL": "C", "LANG": "en_US.UTF-8"}, False, True),
        ({"LANG": "POSIX"}, False, True),
        ({"LANG": "de_DE.ISO-8859-1"}, False, True),
        ({"LANG": "ja_JP.eucJP@x"}, False, True),
        # Python started in LANG=C writes LC_CTYPE=C.UTF-8 into os.environ (PEP 538)
        ({"LANG": "C", "LC_CTYPE": "C.UTF-8"}, True, True),
        ({"LANG": "C", "LC_CTYPE": "C.UTF-8"}, False, False),  # the user's own LC_CTYPE
        ({"LC_CTYPE": "C.UTF-8"}, True, False),  # nothing set: no word either way
        ({"LANG": "C.UTF-8"}, False, False),
        ({"LANG": "en_US.utf8"}, False, False),
        ({"LC_ALL": "en_GB.UTF-8", "LANG": "C"}, False, False),
        ({"LANG": "en_US"}, False, False),
        ({}, False, False),
    ],
)
def test_a_locale_without_utf8_gets_ascii(
    environ: dict[str, str], coerced: bool, ascii: bool
) -> None:
    assert locale_is_ascii(environ, coerced) is ascii
    assert ascii_terminal({"TERM": "xterm-256color", **environ}, coerced) is ascii
    assert ascii_terminal({"TERM": "xterm", "STIFFMON_ASCII": "0", **environ}, coerced) is False


async def test_lang_c_at_start_up_draws_ascii(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LC_CTYPE", raising=False)
    monkeypatch.setenv("LC_ALL", "C")
    app = replay_app(tmp_path)
    assert app.ascii


def _help_lines(app: object) -> list[str]:
    """Every line of the help text, those scrolled out of the box too."""
    table = app.screen.query_one("#help-table")  # type: ignore[attr-defined]
    return [table.render_line(y).text for y in range(table.size.height)]


@pytest.mark.parametrize("size", [(40, 12), (60, 20), (120, 40)])
async def test_help_never_cuts_a_key(tmp_path: Path, size: tuple[int, int]) -> None:
    app = replay_app(tmp_path)
    async with app.run_test(size=size) as pilot:
        await pilot.press("question_mark")
        await pilot.pause()
        text = "\n".join(_help_lines(app))
        keys = [KEY_NAMES.get(b.key, b.key) for b in app.BINDINGS if getattr(b, "description", "")]
        cut = [k for k in keys if k != "ctrl+c" and f" {k} " not in f" {text} ".replace("\n", " ")]
        assert not cut, (cut, text)
        assert "reset zoom" in text and "…  " not in text  # a key column shrunk to an ellipsis


async def test_help_in_ascii_is_ascii(tmp_path: Path) -> None:
    app = replay_app(tmp_path, ascii=True)
    async with app.run_test(size=(40, 12)) as pilot:
        await pilot.press("question_mark")
        await pilot.pause()
        lines = _help_lines(app)
        bad = sorted({ch for line in lines for ch in line if not ch.isascii()})
        assert not bad, "\n".join(lines)
        assert "<-" in "".join(lines)
        box = app.screen.query_one("#help-box")
        assert box.styles.border_top[0] == "ascii"
        bars = box.vertical_scrollbar.renderer  # the thumb's partial blocks are not ASCII
        assert all(ch.isascii() for ch in bars.VERTICAL_BARS + bars.HORIZONTAL_BARS)
