"""What an agent warns of as it is built: settings that make its numbers differ from what the
user may expect, or that will make a measurement fail, said once at the start (a ``warning``
event and a console line each) rather than at the first measurement."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from torch import nn

from stiffmon_agent.announce import unoptimized_note
from stiffmon_agent.failure_hints import loss_signature_note
from stiffmon_agent.precision_note import low_precision_note
from stiffmon_agent.sum_over_option import sum_over_note


def recording_to(path: str, agents: Iterable[Any]) -> Any | None:
    """The first of ``agents`` (open, with a ``record_path``) that records to ``path`` (real
    path), if any."""
    for other in agents:
        if not getattr(other, "closed", True) and getattr(other, "record_path", None) == path:
            return other
    return None


def construction_warnings(
    model: nn.Module,
    loss_fn: Any,
    optimizer: Any,
    *,
    measuring: bool,
    sum_over: float | None,
    record_path: str | None,
    live: Iterable[Any],
) -> list[tuple[str, str]]:
    """(code, message) of each warning due at construction.

    Args:
        model: The model.
        loss_fn: The per-example loss.
        optimizer: The training optimizer.
        measuring: Whether the agent has a probe (measures at all).
        sum_over: The user's ``sum_over=``.
        record_path: The real path of its ``record=`` file (None: none).
        live: The other open agents of this process.
    """
    out: list[tuple[str, str]] = []
    if measuring and (note := low_precision_note(model)):
        out.append(("low-precision", note))
    if note := sum_over_note(sum_over, loss_fn):  # a mean loss ignores the user's
        out.append(("sum-over-ignored", note))
    if measuring and (note := unoptimized_note(model, optimizer)):
        out.append(("params-not-optimized", note))
    if measuring and (note := loss_signature_note(loss_fn)):  # before it fails
        out.append(("loss-signature", f"the measurements will fail: {note}"))
    if record_path is not None and (other := recording_to(record_path, live)) is not None:
        out.append(
            (
                "record-shared",
                f"{other!r} still records to {os.path.basename(record_path)} (a notebook cell "
                "run again?): both runs go into the file, apart by run id; close() the other",
            )
        )
    return out
