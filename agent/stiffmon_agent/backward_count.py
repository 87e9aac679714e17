"""How many backward passes reach the parameters per optimizer step (gradient accumulation).

The batch size B the agent reads from the logits passed to ``step()`` is one micro-batch's under
gradient accumulation, while η/B and the sharpness of a sum-reduced loss need the examples of an
optimizer step. :class:`BackwardCount` counts the backward passes that accumulate into the
smallest trainable parameter's gradient (a post-accumulate-grad hook: once per backward pass
however often the parameter is used) between consecutive optimizer steps, over the first
:data:`JUDGED_STEPS` of them, then removes its hooks: after that it costs nothing. Backward
passes inside ``optimizer.step()`` (the closure of L-BFGS or SAM, evaluated there) are not
counted. The usual count (the most common, a tie going to the smaller) of 2 or more is what the
agent warns about.

Two backward passes per step are not always accumulation (SAM, a GAN's generator loss reaching
the discriminator's parameters), so the agent warns rather than correcting B.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

JUDGED_STEPS = 8  # optimizer steps counted (after the first, which may be partial)


class BackwardCount:
    """Backward passes per optimizer step, learned once.

    Attributes:
        usual: The usual count per optimizer step once judged (None before; 0 if no backward
            pass reached the watched parameter, e.g. gradients set by hand).
    """

    def __init__(self) -> None:
        self.usual: int | None = None
        self._counts: list[int] = []
        self._n = 0
        self._hook: Any = None
        self._after: Any = None  # the step post-hook
        self._in_step = False

    def attach(self, optimizer: Any) -> None:
        """Count the backward passes into ``optimizer``'s smallest trainable parameter."""
        try:
            params = [q for g in optimizer.param_groups for q in g["params"] if q.requires_grad]
            if params:
                smallest = min(params, key=lambda q: q.numel())
                self._after = optimizer.register_step_post_hook(self._on_step_end)
                self._hook = smallest.register_post_accumulate_grad_hook(self._on_backward)
        except Exception:  # an optimizer or parameter we cannot hook: no count, no warning
            self.remove()

    @property
    def counting(self) -> bool:
        """Whether the passes are being counted (attached and not yet judged)."""
        return self._hook is not None

    @property
    def since_step(self) -> int:
        """Backward passes counted since the last optimizer step (0 once judged)."""
        return self._n

    def _on_backward(self, _param: Any) -> None:
        if not self._in_step:
            self._n += 1

    def _on_step_end(self, *_: Any) -> None:
        self._in_step = False

    def on_optimizer_step(self) -> None:
        """An optimizer step starts: the backward passes since the last one make a cycle."""
        if self._hook is None:
            return
        self._in_step = True
        self._counts.append(self._n)
        self._n = 0
        if len(self._counts) > JUDGED_STEPS:
            counts = Counter(self._counts[1:])
            self.usual = max(counts, key=lambda k: (counts[k], -k))
            self.remove()

    def remove(self) -> None:
        """Stop counting (judged, or the agent is closed)."""
        for hook in (self._hook, self._after):
            if hook is not None:
                hook.remove()
        self._hook = self._after = None
