"""The monitor's key bindings (the help screen and the footer list them from here)."""

from __future__ import annotations

from textual.binding import Binding, BindingType

from stiffmon.tui.views import VIEWS

BINDINGS: list[BindingType] = [
    *(Binding(v.key, f"view('{v.name}')", v.title, show=False) for v in VIEWS),
    Binding("question_mark", "help", "help"),
    Binding("q", "quit", "quit"),
    Binding("ctrl+c", "quit", "quit", show=False, priority=True),
    Binding("space", "pause", "pause/play"),
    Binding("left", "scrub(-1)", "earlier measurement", show=False),
    Binding("right", "scrub(1)", "later measurement", show=False),
    Binding("home", "seek_end(0)", "replay: start", show=False),
    Binding("end", "seek_end(1)", "replay: end", show=False),
    Binding("plus,equals_sign", "speed(1)", "replay faster", show=False),
    Binding("minus", "speed(-1)", "replay slower", show=False),
    Binding("z", "zoom(0.5)", "zoom"),
    Binding("Z", "zoom(2)", "zoom out", show=False),
    Binding("less_than_sign", "pan(-1)", "pan left", show=False),
    Binding("greater_than_sign", "pan(1)", "pan right", show=False),
    Binding("comma", "move_cursor(-1)", "cursor left", show=False),
    Binding("full_stop", "move_cursor(1)", "cursor right", show=False),
    Binding("escape", "reset_zoom", "reset zoom / cursor", show=False),
    Binding("l", "flip('log_y')", "log-y", show=False),
    Binding("s", "smoothing", "smoothing", show=False),
    Binding("x", "flip('x_time')", "x: step/time", show=False),
    Binding("b", "block", "stiffness block", show=False),
    Binding("c", "cos_sign", "cosine / sign", show=False),
    Binding("m", "metric", "compare metric", show=False),
    Binding("f", "log_level", "log: level filter", show=False),
    Binding("r", "flip('log_selected_only')", "log: this run / all", show=False),
    Binding("slash", "log_filter", "log: text filter", show=False),
    Binding("shift+left", "cursor(0,-1)", "heatmap cell left", show=False),
    Binding("shift+right", "cursor(0,1)", "heatmap cell right", show=False),
    Binding("shift+up", "cursor(-1,0)", "heatmap cell up", show=False),
    Binding("shift+down", "cursor(1,0)", "heatmap cell down", show=False),
    Binding("left_square_bracket", "select_run(-1)", "previous run", show=False),
    Binding("right_square_bracket", "select_run(1)", "next run", show=False),
    Binding("t", "toggle_run", "show / hide run", show=False),
    Binding("o", "order", "run order: connect / name / lr", show=False),
    Binding("e", "screenshot", "screenshot"),
    Binding("ctrl+l", "redraw", "redraw", show=False),
]
