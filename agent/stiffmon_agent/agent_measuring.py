"""The agent's heavy measurements between steps: run what is due and publish its coverage.

:class:`MeasuringAgent` is a base of :class:`~stiffmon_agent.agent.Agent` (which sets the
attributes declared here). :meth:`~MeasuringAgent._measure_due` runs at the steps the
measurement plan makes due (``Agent.step`` compares the step with ``_next_due``, one comparison
per step); after them, rank 0 publishes each metric's coverage (measured / due / skipped by the
overhead cap) as a ``scalars`` message at that step.

A Ctrl-C (``KeyboardInterrupt``, a notebook's interrupt) inside a measurement still ends the
cell, but the step it interrupted counts as taken (the next ``step()`` is the next step, not the
same one again: the per-step losses keep their step numbers), the measurement is not run again
at that step, and a ``measurement-interrupted`` warning event says what was lost. The model, its
gradients and the RNG states are restored by :func:`~stiffmon_agent.metrics.state.measurement_mode`
on the way out, so training on gives the losses it would have given without the measurement.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from stiffmon import protocol as p
from stiffmon_agent.budget import MeasurementBudget
from stiffmon_agent.metrics.state import threads_note
from stiffmon_agent.publisher import Publisher
from stiffmon_agent.runner import MeasurementRunner
from stiffmon_agent.schedules import MeasurementPlan

__all__ = ["MeasuringAgent"]


class MeasuringAgent:
    """:meth:`_measure_due` and :attr:`disabled`; ``Agent`` sets the attributes below."""

    enabled: bool  # publishes (False: a rank other than 0)
    step_count: int  # the next step's number
    publisher: Publisher | None
    _runner: MeasurementRunner | None
    _plan: MeasurementPlan
    _budget: MeasurementBudget
    _next_due: float

    if TYPE_CHECKING:  # AgentOutput's, the agent's other base

        def _submit(
            self, cls: type[p.Message], fields: dict[str, Any], step: int | None = None
        ) -> None: ...

        def event(
            self,
            code: str,
            message: str,
            level: str = "info",
            *,
            at_step: int | None = None,
            **attrs: Any,
        ) -> None: ...

    def _measure_due(self, s: int) -> None:
        """Run what is due at step ``s``, publish the coverage, and find the next due step."""
        runner = self._runner
        if runner is None:  # never: without a runner nothing is ever due (_next_due is inf)
            return
        due = self._plan.due(s)
        kind = ""
        try:
            for kind in due:
                self._busy(kind)  # the heartbeats say so: no step comes meanwhile, no hang
                if runner.measure(kind, s):
                    self._plan.ran(kind, s)
            kind = ""  # measured: a Ctrl-C from here on loses nothing of them
            self._busy("")
            if (note := threads_note(self)) is not None:  # trials in threads of one process
                self.event("threads-shared-state", note, level="warning")
            if not self.enabled and runner.shard is None:  # sharding stopped: nothing left
                self._next_due = math.inf
                return
            if due and self.enabled:
                cov = self._budget.coverage_scalars(due)
                fields = {"values_names": list(cov), "values_raw": list(cov.values())}
                self._submit(p.Scalars, fields, step=s)
        except KeyboardInterrupt:
            self._busy("")
            self._interrupted(kind, s)
            raise
        self._next_due = self._plan.next_after(s)

    def _busy(self, kind: str) -> None:
        """Tell the publisher thread which measurement the loop is in (``""``: none), for its
        heartbeats: the monitor then shows the run measuring rather than hung."""
        if self.publisher is not None:
            self.publisher.measuring = kind

    def _interrupted(self, kind: str, s: int) -> None:
        """Ctrl-C in the ``kind`` measurement of step ``s``: the step counts as taken (``step()``
        would have moved on after the measurement), nothing more is measured at it, and an
        event says so; the caller re-raises."""
        self.step_count = max(self.step_count, s + 1)
        self._next_due = self._plan.next_after(s)
        if self.enabled and kind:
            message = (
                f"{kind} measurement of step {s} interrupted (KeyboardInterrupt): not measured; "
                "the model, its gradients and the random states are as before it"
            )
            self.event("measurement-interrupted", message, "warning", at_step=s, metric=kind)

    @property
    def disabled(self) -> dict[str, str]:
        """Metrics disabled after an error, with the reason."""
        return dict(self._runner.disabled) if self._runner is not None else {}
