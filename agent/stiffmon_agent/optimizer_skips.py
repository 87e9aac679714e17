"""Training steps without an optimizer step: counted, published and said.

``GradScaler`` skips ``optimizer.step()`` when a step's gradients hold inf or NaN (in float16
often the first few steps, while it finds its scale, and after any overflow); the weights do not
change at such a step. :class:`~stiffmon_agent.step_scalars.OptimizerColumns` tells which
``agent.step()`` calls had none; this counts them, publishes the running count as the ``scalars``
value ``optimizer/skipped`` (:data:`stiffmon.derive.OPTIMIZER_SKIPPED`) at the skipped step, and
says so in a warning ``event`` ``optimizer-step-skipped`` and a log line at the 1st, 2nd, 5th,
10th, ... skip. The count goes out at every skip but at most every :data:`MIN_INTERVAL` seconds
(a loop whose every step is skipped sends a few messages a second, not one per step); the last
count is sent at the next step past the interval, or at ``close``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from stiffmon import protocol as p
from stiffmon.derive import OPTIMIZER_SKIPPED
from stiffmon_agent.userlog import log_spaced

log = logging.getLogger("stiffmon_agent")

MIN_INTERVAL = 0.5


class OptimizerSkips:
    """The running count of steps without an optimizer step.

    Args:
        submit: Publishes a message: ``submit(cls, fields, step=...)``.
        event: Publishes an ``event``: ``event(code, message, level=..., **attrs)``.
    """

    def __init__(self, submit: Callable[..., None], event: Callable[..., None]) -> None:
        self._submit = submit
        self._event = event
        self.count = 0
        self.pending: int | None = None  # a skipped step whose count is not sent yet
        self._sent_at = -float("inf")

    def note(self, step: int, now: float) -> None:
        """Count ``step`` (skipped; ``now``: unix time) and publish as the intervals allow."""
        self.count += 1
        said = log_spaced(self.count)
        if said:
            msg = (
                f"no optimizer step at step {step}: the weights did not change (GradScaler skips "
                f"a step whose gradients are inf/NaN); {self.count} such step(s) so far"
            )
            self._event("optimizer-step-skipped", msg, level="warning", skipped=self.count)
            log.info(f"stiffmon: {msg}")
        self.pending = step
        if said or now - self._sent_at >= MIN_INTERVAL:
            self.send(now)

    def tick(self, now: float) -> None:
        """At a step while a count is pending: send it once the interval has passed."""
        if now - self._sent_at >= MIN_INTERVAL:
            self.send(now)

    def send(self, now: float) -> None:
        """Publish the count at the pending step (nothing if none)."""
        if self.pending is None:
            return
        fields: dict[str, Any] = {
            "values_names": [OPTIMIZER_SKIPPED],
            "values_raw": [float(self.count)],
        }
        self._submit(p.Scalars, fields, step=self.pending)
        self.pending = None
        self._sent_at = now
