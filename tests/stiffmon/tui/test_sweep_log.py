"""The log at a narrow width (a 100-column terminal leaves it about 75) with a 24-run sweep:
each line names its run (cut short, names kept apart), not only by one of ten colours."""

from __future__ import annotations

import numpy as np
from rich.console import Console

from stiffmon.tui.renderables.eventlog import EventLog, LogRow

LRS = [f"{lr:.4g}" for lr in np.geomspace(0.003, 12, 24)]


def render(renderable: object, width: int) -> str:
    console = Console(width=width, color_system=None, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(renderable)
    return console.export_text()


def test_each_line_of_a_narrow_log_names_its_run() -> None:
    rows = [
        LogRow("info", 299, 64.0, f"sgd lr={lr}", "#e45756", f"event of run {i}")
        for i, lr in enumerate(LRS)
    ]
    out = render(EventLog(rows, height=40), 75)
    for i, lr in enumerate(LRS):
        line = next(ln for ln in out.splitlines() if ln.rstrip().endswith(f"event of run {i}"))
        assert lr in line, (lr, line)
