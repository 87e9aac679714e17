"""What the training thread hands the publisher thread, and how it becomes a message there.

An :class:`Outgoing` is a message without its run id and sequence number; the publisher thread
numbers it and builds it (:func:`build_message`): per-step batches become a ``columns``
message (:func:`~stiffmon_agent.columns.build_columns`), the raw values of a ``scalars``
message become floats. Conversions of tensors happen there, so a GPU value never makes the
training thread wait.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from stiffmon import protocol as p
from stiffmon_agent.columns import RawColumns, build_columns


@dataclass(frozen=True)
class Outgoing:
    """A message without its run id and sequence number, made on the training thread.

    ``fields`` may hold tensors for the scalars of a step (``.item()`` runs on the publisher
    thread, so a GPU loss never forces the training thread to synchronise).
    """

    cls: type[p.Message]
    step: int
    t: float
    fields: dict[str, Any] = field(default_factory=dict)


def build_message(
    item: Outgoing, run: str, seq: int, problems: set[str] | None = None
) -> p.Message:
    """The message of ``item`` for ``run`` with sequence number ``seq`` (on the publisher
    thread). A ``columns`` batch's ``{"raw": RawColumns}`` is converted (why some values could
    not be, e.g. an accuracy's shapes, is added to ``problems``); the ``values_raw`` of a
    ``scalars`` item become floats (NaN where one does not convert)."""
    if item.cls is p.Columns:
        raw: RawColumns = item.fields["raw"]
        return build_columns(raw, run=run, seq=seq, problems=problems)
    fields = dict(item.fields)
    if item.cls is p.Scalars:
        names = tuple(fields.pop("values_names", ()))
        values = []
        for v in fields.pop("values_raw", ()):
            try:
                values.append(float(v))
            except Exception:
                values.append(math.nan)
        fields["names"], fields["values"] = names, values
    return item.cls(run=run, seq=seq, step=item.step, t=item.t, **fields)
