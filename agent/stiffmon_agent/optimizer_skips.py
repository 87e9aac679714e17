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
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from stiffmon import protocol as p
from stiffmon.derive import OPTIMIZER_SKIPPED
from stiffmon_agent.userlog import log_spaced

log = logging.getLogger("stiffmon_agent")

MIN_INTERVAL = 0.5
CYCLES_KNOWN = 4  # cycles seen before the usual one is trusted
HOLD_MAX = 128  # calls without an optimizer step held while the usual cycle is not known yet


class Cycles:
    """Which ``agent.step()`` calls without an optimizer step are skipped steps.

    Gradient accumulation with ``agent.step()`` per micro-batch makes ``k − 1`` such calls before
    every optimizer step, by design; a skipped step makes a cycle (calls from one optimizer step
    to the next) longer than the usual one: the most common of the last 16, once
    :data:`CYCLES_KNOWN` are seen (calls before that are held, up to :data:`HOLD_MAX`). A cycle
    of ``L > k`` calls made ``L − k`` skipped ones first (``k = 1``: every such call): told as
    soon as the cycle is that long.
    """

    def __init__(self) -> None:
        self.lengths: deque[int] = deque(maxlen=16)
        self.held: list[tuple[list[int], int]] = []  # whole cycles (calls, told) to judge later
        self.told = 0  # calls of the current cycle told already
        self._usual: int | None = None  # judged at the current cycle's first such call

    def usual(self) -> int | None:
        """The usual cycle length (1 without accumulation); None while too few are seen."""
        if len(self.lengths) < CYCLES_KNOWN:
            return None
        counts = Counter(self.lengths)  # a tie goes to the shorter cycle
        return max(counts, key=lambda length: (counts[length], -length))

    def forget_first(self, quiet: list[int]) -> None:
        """The first call (``1``, held while the loop's order was judged) had no optimizer step
        before it because ``agent.step()`` comes first: not a skipped step."""
        if quiet[:1] == [1]:
            del quiet[0]
        elif self.held and self.held[0][0][:1] == [1]:
            del self.held[0][0][0]
            if self.lengths:
                self.lengths[0] -= 1

    def tell(self, quiet: list[int], stepped: bool, sure: bool) -> list[int]:
        """The calls of ``quiet`` (the current cycle's calls without an optimizer step, in call
        order; cleared when the cycle ends) that are skipped steps, told at this call.

        Args:
            quiet: The current cycle's calls without an optimizer step.
            stepped: This call had an optimizer step since the last one (the cycle ends).
            sure: Calls may be told (the order is judged; the hook sees steps).
        """
        if stepped:
            self.lengths.append(len(quiet) + 1)
            cycle, told = quiet[:], self.told
            quiet.clear()
            self.told = 0
            k = self.usual() if sure else None
            if k is None:
                self.held.append((cycle, told))
                return []
            out = [q for c, t in self.held for q in c[t : len(c) - (k - 1)]]
            self.held.clear()
            return out + cycle[told : len(cycle) - (k - 1)]
        if len(quiet) == 1:  # a new cycle: the lengths stay as they are until it ends
            self._usual = self.usual()
        k = self._usual if sure else None
        if k is None and sure and len(quiet) > HOLD_MAX:
            k = 1  # not accumulation: told now (and bounded)
        if k is None or len(quiet) - (k - 1) <= self.told:
            return []
        out = quiet[self.told : len(quiet) - (k - 1)]
        self.told = len(quiet) - (k - 1)
        return out


class OptimizerSkips:
    """The running count of steps without an optimizer step.

    Args:
        submit: Publishes a message: ``submit(cls, fields, step=...)``.
        event: Publishes an ``event``: ``event(code, message, level=..., **attrs)``.

    Attributes:
        who: The prefix of its console lines (the agent sets ``stiffmon [run name]``).
    """

    def __init__(self, submit: Callable[..., None], event: Callable[..., None]) -> None:
        self._submit = submit
        self._event = event
        self.count = 0
        self.pending: int | None = None  # a skipped step whose count is not sent yet
        self._sent_at = -float("inf")
        self.who = "stiffmon"

    def note(self, step: int, now: float) -> None:
        """Count ``step`` (skipped; ``now``: unix time) and publish as the intervals allow."""
        self.count += 1
        said = log_spaced(self.count)
        if said:
            msg = (
                f"no optimizer step at step {step} (GradScaler skips a step whose gradients are "
                "inf/NaN: the weights do not change); a loop that steps a new optimizer object "
                "leaves the agent reading the one it was given: pass the new one to "
                "agent.set_optimizer() where the loop makes it (or close the agent and make one "
                f"with the new optimizer and start_step={step}); {self.count} such step(s) so far"
            )
            code = "optimizer-step-skipped"
            self._event(code, msg, level="warning", at_step=step, skipped=self.count)
            log.info(f"{self.who}: {msg}")
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
