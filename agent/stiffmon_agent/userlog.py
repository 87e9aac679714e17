"""Helpers of :meth:`Agent.log <stiffmon_agent.Agent.log>` and the measurement-coverage messages.

Everything here runs on the training thread and must be cheap and never raise: values are only
checked (no ``.item()``, so no GPU synchronisation); they become floats on the publisher thread.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

CUSTOM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-/]{0,63}")
"""Names accepted by ``Agent.log`` (published as ``custom/<name>``)."""


def log_spaced(n: int) -> bool:
    """True at n = 1, 2, 5, 10, 20, 50, 100, …: when to repeat a message about ``n`` repeats."""
    if n < 1:
        return False
    while n % 10 == 0:
        n //= 10
    return n in (1, 2, 5)


class FiniteOrNaN:
    """A user value, converted on the publisher thread: its float if finite, else NaN."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __float__(self) -> float:
        x = float(self.value)
        return x if math.isfinite(x) else math.nan


def custom_scalars(
    values: Mapping[str, Any], warned: set[str], warn: Callable[[str], None]
) -> tuple[list[str], list[FiniteOrNaN]]:
    """Validate ``Agent.log``'s values: names ``custom/<name>`` and deferred floats.

    A bad name, or a value that is neither a number nor a one-element tensor, is dropped; the
    first time per name ``warn`` is called with the reason (the name then goes into ``warned``).
    """
    names: list[str] = []
    raw: list[FiniteOrNaN] = []
    for name, value in values.items():
        problem = ""
        if not isinstance(name, str) or not CUSTOM_NAME.fullmatch(name):
            problem = "a name of letters, digits, _ . - / (at most 64 characters)"
        elif isinstance(value, Tensor):
            if value.numel() == 1:
                value = value.detach()
            else:
                problem = f"a number or a one-element tensor, not shape {tuple(value.shape)}"
        elif isinstance(value, str | bytes) or not hasattr(value, "__float__"):
            problem = f"a number, not {type(value).__name__}"
        if problem:
            if name not in warned:
                warned.add(name)
                warn(f"stiffmon: Agent.log dropped {name!r}: it needs {problem}")
            continue
        names.append(f"custom/{name}")
        raw.append(FiniteOrNaN(value))
    return names, raw


def custom_fields(
    values: Mapping[str, Any],
    step: Any,
    last_step: int,
    warned: set[str],
    warn: Callable[[str], None],
) -> tuple[int, dict[str, Any]] | None:
    """``Agent.log``'s message: its step (``last_step`` unless ``step`` is an int ≥ 0) and the
    ``scalars`` fields of :func:`custom_scalars`; None when no value is left."""
    names, raw = custom_scalars(values, warned, warn)
    if not names:
        return None
    if step is None or isinstance(step, bool) or not isinstance(step, int) or step < 0:
        step = last_step
    return step, {"values_names": names, "values_raw": raw}
