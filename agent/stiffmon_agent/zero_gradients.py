r"""Probe examples with a zero gradient: why the cosine and sign stiffness views then differ.

An example whose loss is flat in the parameters (a satisfied margin, dead or saturated units, a
loss at its floor) has g_i = 0, so G_ii = 0 and G_ij = 0 for every j. The two stiffness views
treat its pairs differently, as their definitions say (:mod:`~stiffmon_agent.metrics.stiffness`):

* cosine stiffness g_i · g_j / (‖g_i‖ ‖g_j‖) is 0/0, NaN, and the pair is left out of every mean
  (class stiffness, per-layer stiffness, the distance curves);
* sign stiffness sign(g_i · g_j) = sign(0) = 0 counts, pulling its means towards 0.

With many such examples the two heatmaps of one measurement disagree much, and nothing else
says why. :func:`zero_gradient_event` says it (an info ``event`` ``zero-gradients``), and
:class:`ZeroGradientSayer` keeps it from repeating: said the first time, again only where the
share of such examples moved by :data:`SHARE_STEP` or more since it was last said, at most
:data:`MAX_SAYS` times in a run.
"""

from __future__ import annotations

from torch import Tensor

from stiffmon import protocol as p
from stiffmon_agent.outgoing import Outgoing

ZERO_CODE = "zero-gradients"
SHARE_STEP = 0.25
"""How far the share of zero-gradient examples must move to be said again."""
MAX_SAYS = 5


def zero_gradient_event(gram: Tensor, n_train: int, step: int, t: float) -> Outgoing | None:
    """The ``zero-gradients`` info event of a Gram matrix with zero diagonal entries, or None.

    Args:
        gram: The (N, N) Gram matrix G of the probe (train examples first, then val).
        n_train: The number of train examples.
        step: The measurement's step.
        t: Its time.

    Returns:
        The event (attrs ``zero``, ``zero_train``, ``examples``, ``share``), or None where every
        example's gradient is non-zero.
    """
    zero = gram.diagonal() <= 0  # cosine_stiffness's 0/0: the norm is exactly zero
    k = int(zero.sum())
    if k == 0:
        return None
    n = int(gram.shape[0])
    k_train = int(zero[:n_train].sum())
    where = "" if k_train == k else f" ({k_train} of them in the train probe)"
    message = (
        f"{k} of {n} probe examples ({100 * k / n:.0f} %) have a zero gradient{where} (a "
        "satisfied margin, dead or saturated units, a loss at its floor): cosine stiffness leaves "
        "their pairs out (0/0 has no cosine) while sign stiffness counts them as sign(0) = 0, so "
        "the cosine and sign views summarise different pairs and can disagree"
    )
    attrs = {"zero": k, "zero_train": k_train, "examples": n, "share": k / n}
    fields = {"level": "info", "code": ZERO_CODE, "message": message, "attrs": attrs}
    return Outgoing(p.Event, step, t, fields)


class ZeroGradientSayer:
    """Whether a ``zero-gradients`` event is said (see the module docstring).

    Attributes:
        said: The share of zero-gradient examples last said, or None before the first.
        times: How many times it was said.
    """

    def __init__(self) -> None:
        self.said: float | None = None
        self.times = 0

    def due(self, share: float) -> bool:
        """Whether to say a measurement's ``share`` of zero-gradient examples (and note it)."""
        if self.times >= MAX_SAYS:
            return False
        if self.said is not None and abs(share - self.said) < SHARE_STEP:
            return False
        self.said, self.times = share, self.times + 1
        return True
