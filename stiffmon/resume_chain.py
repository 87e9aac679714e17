"""Runs resumed from a checkpoint: which recorded run a resumed one continues, and its series
joined across the seam.

A run that crashed at step 1234 after its last checkpoint at step 1000 and was restarted with
``Agent(start_step=1000)`` leaves two runs (two run ids, usually one name): the dead one with
steps 0 … 1233, the resumed one from step 1000 on; steps 1000 … 1233 were recorded twice. Each
stays a run of its own, with its own values (nothing is merged, nothing is dropped). What needs
both is the break-even point: it lies early in training, so for the resumed run it is usually
in the dead run's recording, and the early-peak rule applied to measurements from step 1000 on
alone would call any later bump of λ1 an "early-phase peak".

The run ``r`` continues ``o`` (:func:`find_continued`) when ``o`` is another run of the same
name (the integrations' suffix ``" (resumed at step N)"`` left out), with its first step s₀(o) <
s₀(r) ≤ s₁(o) + 1 (the resumed run starts inside or right after the steps ``o`` recorded) and
that started before it (first wall time); of several, the latest started. The joined series of
``r`` (:func:`joined`) is that of ``o`` (itself joined) at the steps < s₀(r), then those of ``r``:
at every step the values of the run that continued training from there.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from stiffmon.run_data import RunData

_RESUMED = re.compile(r" \(resumed at step \d+\)$")
MAX_CHAIN = 64
"""Most runs followed back along a chain of resumptions (a guard against cycles)."""


def base_name(name: str) -> str:
    """The run's name without the integrations' ``" (resumed at step N)"`` suffix."""
    return _RESUMED.sub("", name)


def find_continued(rd: RunData, runs: Iterable[RunData]) -> RunData | None:
    """The run ``rd`` continues (rule in the module doc), or None (it starts at step 0, or no
    such run is known)."""
    first = rd.first_step
    if not first or math.isnan(rd.first_t):
        return None
    name = base_name(rd.name)
    best: RunData | None = None
    for o in runs:
        if o is rd or o.first_step is None or base_name(o.name) != name:
            continue
        if not (o.first_step < first <= o.last_step + 1) or not o.first_t < rd.first_t:
            continue
        if best is None or o.first_t > best.first_t:
            best = o
    return best


def chain(rd: RunData) -> list[RunData]:
    """``rd`` and the runs it continues, latest first (at most :data:`MAX_CHAIN`)."""
    out = [rd]
    while out[-1].continues is not None and len(out) < MAX_CHAIN:
        nxt = out[-1].continues
        if nxt in out:
            break
        out.append(nxt)
    return out


def joined(
    rd: RunData, name: str
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Steps, wall times and values of series ``name`` along the chain of ``rd``: each earlier
    run's points before the first step of the run that continued it, then the later run's."""
    parts: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]]]
    parts = []
    limit: int | None = None
    for r in chain(rd):
        s = r.scalars.get(name)
        if s is not None and len(s):
            keep = slice(None) if limit is None else s.steps < limit
            parts.append((s.steps[keep], s.times[keep], s.values[keep]))
        limit = r.first_step if limit is None else min(limit, r.first_step or 0)
    if not parts:
        empty = np.empty(0)
        return empty.astype(np.int64), empty, empty
    if len(parts) == 1:
        return parts[0]
    parts.reverse()
    return tuple(np.concatenate(c) for c in zip(*parts, strict=True))  # type: ignore[return-value]


def root_first_step(rd: RunData) -> int | None:
    """The first step recorded along the chain of ``rd`` (0 when it reaches the run's start)."""
    return chain(rd)[-1].first_step


def resume_note(rd: RunData, o: RunData | None) -> str:
    """The log line of a run recorded from a step after 0, with or without the run it continues."""
    first = rd.first_step
    if o is None:
        return (
            f"recorded from step {first} on (resumed from a checkpoint, or joined late), and no "
            "run it continues is open: its break-even is judged on its own measurements without "
            "the early-phase-peak rule (the early phase is not in them); open the earlier run's "
            "recording too to judge it across the seam"
        )
    assert first is not None
    both = (
        f"steps {first}–{o.last_step} were recorded by both (each run keeps its own values); "
        if o.last_step >= first
        else ""
    )
    return (
        f"resumed at step {first}: continues run '{o.name}' ({o.run}, steps {o.first_step}–"
        f"{o.last_step}); {both}the break-even is judged on that run's measurements before "
        f"step {first} and this run's from there"
    )
