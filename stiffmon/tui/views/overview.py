"""Overview: every run's health in words, loss, λ1_H, within-class stiffness and Tr K."""

from __future__ import annotations

from rich.text import Text
from textual.containers import Grid, Vertical
from textual.widget import Widget
from textual.widgets import Static

from stiffmon.tui.renderables.axes import WordCutLines, cut
from stiffmon.tui.views.base import ChartView, View, capped, run_color
from stiffmon.tui.views.sharpness import sharpness_chart

LEVEL_STYLE = {"ok": "dim", "warning": "yellow", "error": "bold red"}


class Overview(View):
    name = "overview"
    key = "1"
    title = "overview"

    def widget(self) -> Widget:
        return Vertical(
            Static(id="overview-health"),
            Grid(
                ChartView(self.metric_chart("loss", "loss"), classes="chart"),
                ChartView(sharpness_chart(self, compact=True), classes="chart"),
                ChartView(
                    self.metric_chart(
                        "stiffness/cos/train-train/within", "within-class stiffness", ref=0.0
                    ),
                    classes="chart",
                ),
                ChartView(
                    self.metric_chart("noise/trace_k", "Tr K (gradient noise)"), classes="chart"
                ),
                classes="grid2",
            ),
            id=self.name,
        )

    def refresh(self) -> None:
        lines = list(self.health_text().split("\n"))  # each cut at a word: no number in half
        self.app.query_one("#overview-health", Static).update(WordCutLines(lines, self.app.ascii))
        super().refresh()

    def health_text(self) -> Text:
        """One line per run with a problem; else one line counting runs by state."""
        app = self.app
        now = app.clock()
        counts: dict[str, int] = {}
        lines: list[Text] = []
        names: list[str] = []
        for rd in app.store.runs.values():
            h = app.health(rd, now)
            counts[h.state] = counts.get(h.state, 0) + 1
            if h.level == "ok":
                continue
            words = "; ".join([*h.problems, *([h.text] if h.state != "finished" else [])])
            lines.append(
                Text.assemble(
                    ("# " if app.ascii else "■ ", run_color(rd)),
                    (f"{rd.name}: ", "bold"),
                    (words, LEVEL_STYLE[h.level]),
                    no_wrap=True,
                    overflow=cut(app.ascii),
                )
            )
            names.append(rd.name)

        def more(left: list[Text]) -> Text:  # runs past the box's height: named, not dropped
            runs = ", ".join(names[len(names) - len(left) :])
            return Text(f"+{len(left)} more runs with problems: {runs}", style="bold")

        lines = capped(app.query_one("#overview-health", Static), lines, more)
        if not lines:
            summary = ", ".join(f"{n} {state}" for state, n in counts.items())
            lines.append(Text(f"runs: {summary or 'none'}; no problems", style="dim"))
        text = Text("\n").join(lines)
        text.no_wrap, text.overflow = True, cut(app.ascii)
        return text
