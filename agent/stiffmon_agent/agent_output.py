"""What the agent hands to its publisher thread: events, ``Agent.log`` values, column batches,
and the ``bye`` that ends them (:meth:`AgentOutput.close`).

:class:`AgentOutput` is a base of :class:`~stiffmon_agent.agent.Agent` (which sets the attributes
declared here). None of it blocks or raises into the training loop: items go to the publisher's
bounded queue (:meth:`~stiffmon_agent.publisher.Publisher.submit`), and without a publisher (a
rank that does not publish, or ``endpoint=""`` without ``record``) they go nowhere.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

from stiffmon import protocol as p
from stiffmon.registry import unregister
from stiffmon_agent.announce import accumulation_advice, log, speaker
from stiffmon_agent.columns import ColumnBatcher, RawColumns
from stiffmon_agent.metrics.probe import LossFn, loss_reduction
from stiffmon_agent.optimizer_skips import OptimizerSkips
from stiffmon_agent.outgoing import Outgoing
from stiffmon_agent.publisher import Publisher
from stiffmon_agent.sharpness_state import SharpnessState
from stiffmon_agent.step_scalars import OptimizerColumns
from stiffmon_agent.userlog import custom_fields

LIVE_AGENTS: weakref.WeakSet[AgentOutput] = weakref.WeakSet()  # open, closed at exit


class AgentOutput:
    """The agent's messages to its publisher thread; ``Agent`` sets the attributes below."""

    publisher: Publisher | None
    step_count: int
    enabled: bool  # publishes (False: a rank other than 0)
    closed: bool
    name: str  # the run's display name
    loss_fn: LossFn
    _columns: ColumnBatcher
    _log_warned: set[str]  # names (and "") already warned about by log()
    _batch_size: int | None  # B as given (None: read from the logits)
    _sharp_state: SharpnessState
    _optimizer_columns: OptimizerColumns
    _skips: OptimizerSkips
    _registry_run: str | None

    def _submit(
        self, cls: type[p.Message], fields: dict[str, Any], step: int | None = None
    ) -> None:
        if self.publisher is not None:
            self.publisher.submit(
                Outgoing(cls, self.step_count if step is None else step, time.time(), fields)
            )

    def _submit_columns(self, raw: RawColumns) -> bool:
        if self.publisher is None:
            return False
        step, t, _ = raw.rows[-1]
        full = len(raw.rows) >= self._columns.max_rows
        return self.publisher.submit(Outgoing(p.Columns, step, t, {"raw": raw}), wake=full)

    def event(
        self,
        code: str,
        message: str,
        level: str = "info",
        *,
        at_step: int | None = None,
        **attrs: Any,
    ) -> None:
        """Publish an ``event`` message (shown by the monitor), at the current step or
        ``at_step``."""
        fields = {"level": level, "code": code, "message": message, "attrs": attrs}
        self._submit(p.Event, fields, step=at_step)

    def warn(self, code: str, note: str, *, console: bool = True, **attrs: Any) -> None:
        """A warning ``event``, and (``console``) the same line on the console, naming the run."""
        if console:
            log.warning("%s: %s", speaker(self.name), note)
        self.event(code, note, level="warning", **attrs)

    def _on_wake(self) -> None:
        """At each wake of the publisher thread: batches at its pace (slower while nobody
        subscribes), and the current one sent if it is older."""
        if self.publisher is not None:
            self._columns.interval = self.publisher.interval
        self._columns.flush(older_than=self._columns.interval)

    def log(self, step: int | None = None, **values: Any) -> None:
        """Publish scalars of your own (validation loss, accuracy, ...) as ``custom/<name>``.

        Never raises and never blocks: a bad name (not matching ``userlog.CUSTOM_NAME``) or a value
        that is not a number or a one-element tensor is dropped with a one-time warning; values
        become floats on the publisher thread (no GPU synchronisation here), ±inf becomes NaN.

        Args:
            step: The step the values belong to (default: the last step recorded).
            **values: ``name=value`` pairs, e.g. ``agent.log(val_loss=0.31, val_acc=0.9)``; names
                with ``/``, ``.`` or ``-`` via ``**{"val/loss": v}``.
        """
        if not self.enabled or self.closed or self.publisher is None:
            return
        try:
            last = max(self.step_count - 1, 0)
            got = custom_fields(values, step, last, self._log_warned, log.warning)
            if got is not None:
                self.publisher.submit(Outgoing(p.Scalars, got[0], time.time(), got[1]))
        except Exception as exc:  # never into the training loop
            if "" not in self._log_warned:
                self._log_warned.add("")
                log.warning(f"stiffmon: Agent.log failed: {exc}")

    def _publishing_seconds(self) -> float:
        return self.publisher.cpu_seconds if self.publisher is not None else 0.0

    @property
    def dropped(self) -> int:
        """Messages dropped because the publish queue was full."""
        return self.publisher.dropped if self.publisher is not None else 0

    def _no_acc(self, reason: str) -> None:
        """The ``accuracy-unavailable`` event for logits/targets that do not compare (said once;
        whether earlier steps had an accuracy is known only on the publisher thread)."""
        what = f"no accuracy at step {self.step_count} (NaN) and at steps like it: {reason}"
        self.event("accuracy-unavailable", what, level="warning")

    def _say_accumulation(self, k: int) -> None:
        """Warn that B read from the logits is one micro-batch's when ``k`` backward passes
        reach the parameters per optimizer step (said only where B comes from the logits)."""
        b = self._sharp_state.batch_size
        if self._batch_size is not None or not b:
            return
        advice = accumulation_advice(k, b, loss_reduction(self.loss_fn) == "sum")
        self.warn("batch-size-accumulation", advice, backwards=k, batch_size=b)

    def close(self, reason: str = "closed", timeout: float = 5.0) -> None:
        """Send ``bye``, flush the queue (at most ``timeout`` seconds) and release everything."""
        if self.closed:
            return
        self.closed = True
        LIVE_AGENTS.discard(self)
        self._optimizer_columns.remove_hook()
        if self.publisher is not None:
            self._columns.flush()
            self._skips.send(time.time())
            self._submit(p.Bye, {"reason": reason}, step=max(self.step_count - 1, 0))
            if not self.publisher.close(timeout):
                log.warning("stiffmon: could not flush everything before the timeout")
        if self._registry_run is not None:
            unregister(self._registry_run)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(
            reason="closed"
            if exc_type is None
            else f"error: {getattr(exc_type, '__name__', exc_type)}"
        )
