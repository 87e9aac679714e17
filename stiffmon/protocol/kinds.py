"""The registry of message kinds, the union of all message types and ``expand_columns``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeAlias

from stiffmon.protocol.columns import Columns
from stiffmon.protocol.messages import (
    Bye,
    Curve,
    Event,
    Heartbeat,
    Hello,
    Matrix,
    Message,
    Scalars,
    Spectrum,
)

MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.KIND: cls
    for cls in (Hello, Scalars, Columns, Matrix, Curve, Spectrum, Event, Heartbeat, Bye)
}
"""Message class for each kind."""

AnyMessage: TypeAlias = (
    Hello | Scalars | Columns | Matrix | Curve | Spectrum | Event | Heartbeat | Bye
)

PER_STEP_KINDS = ("scalars", "columns")
"""Kinds that carry per-step scalars: one step per ``scalars``, a batch per ``columns``."""


def expand_columns(msgs: Iterable[AnyMessage]) -> list[AnyMessage]:
    """The messages with every ``columns`` batch replaced by one ``scalars`` message per row."""
    out: list[AnyMessage] = []
    for m in msgs:
        if isinstance(m, Columns):
            out.extend(m.rows())
        else:
            out.append(m)
    return out
