"""What the agent says about itself when it starts: its rank, the ``hello`` and the local registry.

* :data:`log`: the ``stiffmon_agent`` logger (printing plain lines unless logging is set up);
* :func:`speaker`: the prefix of a run's console lines (``stiffmon [run name]``);

* :func:`unoptimized_note`, :func:`accumulation_advice`: the warnings about parameters the
  optimizer does not hold and about gradient accumulation;
* :func:`count_weighting_event`, :func:`count_weighting_sayer`: the info event saying how a mean
  over the batch's counted positions (padding, class weights) is measured;
* :func:`startup_line`: the console line an agent starts with;
* :func:`dist_rank`: the torch.distributed rank (0 when not distributed);
* :func:`hello_fields`: the fields of the run's ``hello`` message;
* :func:`probe_notes`: what the start says about the probe (no class labels, no distances,
  eval mode: :func:`eval_mode_note`);
* :func:`register_locally`: a registry entry so ``stiffmon watch`` finds the run;
* :func:`start_publisher`: the publisher (sockets, session file), not yet started.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from stiffmon import __version__
from stiffmon.registry import RunEntry, register
from stiffmon.transport import CurveKeys, load_curve_server
from stiffmon_agent.class_target import no_class_note
from stiffmon_agent.freq_scaled import freq_scaling_note
from stiffmon_agent.metrics.state import unoptimized
from stiffmon_agent.metrics.thresholds import maximizes
from stiffmon_agent.probe_set import CountWeighting, ProbeSet
from stiffmon_agent.publisher import Publisher

log = logging.getLogger("stiffmon_agent")
if not log.handlers and not logging.getLogger().handlers:  # say it even if nothing configures
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def speaker(name: str) -> str:
    """The prefix of the console lines about run ``name``: ``stiffmon [name]`` (two agents in
    one process, a GAN's, must say which run a line is about)."""
    return f"stiffmon [{name}]"


def measured_param_count(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Trainable parameters the measurements cover: those the optimizer holds (all of them
    without an optimizer, or when it holds none: an EMA copy, measured whole)."""
    extra, total = unoptimized(model, optimizer)
    left_out = {id(q) for q in extra} if len(extra) < total else set()
    return sum(q.numel() for q in model.parameters() if q.requires_grad and id(q) not in left_out)


def unoptimized_note(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> str:
    """What the measurements make of trainable parameters the optimizer does not hold ("")."""
    extra, total = unoptimized(model, optimizer)
    if not extra:
        return ""
    if len(extra) == total:
        return (
            "the optimizer holds none of the model's trainable parameters (an EMA / averaged "
            "copy?): the measurements use all of them, and no preconditioned sharpness"
        )
    return (
        f"{len(extra)} of the model's {total} trainable parameter tensors are not in this "
        "agent's optimizer: the measurements leave them out (another optimizer may train them, "
        "a GAN's other player; if none does, freezing them saves memory)"
    )


def count_weighting_event(w: CountWeighting) -> tuple[str, str, dict[str, float]]:
    """The info event (code, message, attrs) saying how the probe's per-example losses are
    normalised (:func:`~stiffmon_agent.probe_set.count_weighted`): ``class-weighted`` for
    class weights with one target per example (attrs ``wbar``), ``token-weighted`` for
    per-element targets (attrs ``cbar``, ``low``, ``high``: the mean, smallest and largest
    count of one train example)."""
    effects = "λ1_H, Tr K and the gradient noise are those of that objective on the probe"
    if not w.per_element:
        return (
            "class-weighted",
            "the loss has class weights and one target per example: it trains on Σ w·ℓ / Σ w, "
            "so each probe example's loss is divided by the probe's mean class weight "
            f"w̄ = {w.mean:.6g} ({effects})",
            {"wbar": w.mean},
        )
    weighted = ", class-weighted" if w.class_weights else ""
    return (
        "token-weighted",
        f"the loss averages over the batch's counted positions (Σ c·ℓ / Σ c, ignored targets left "
        f"out{weighted}), not per example: each probe example's loss is its sum over them "
        f"divided by the train probe's mean count per example c̄ = {w.mean:.6g} (one example "
        f"counts {w.low:.6g} to {w.high:.6g}), so {effects}",
        {"cbar": w.mean, "low": w.low, "high": w.high},
    )


def count_weighting_sayer(event: Callable[..., None]) -> Callable[[CountWeighting], None]:
    """``say`` for :func:`~stiffmon_agent.probe_set.count_weighted`: publishes
    :func:`count_weighting_event` through ``event(code, message, **attrs)``."""

    def say(w: CountWeighting) -> None:
        code, message, attrs = count_weighting_event(w)
        event(code, message, **attrs)

    return say


def maximize_note(maximizes: bool | None) -> str:
    """The info event on an optimizer with ``maximize=True`` (all groups: True; some: None)."""
    if maximizes is None:
        return (
            "some param groups have maximize=True and some not: the measurements are of the loss "
            "as given, and no stability threshold applies (no single objective is descended)"
        )
    return (
        "the optimizer maximizes the loss (maximize=True): the measurements are of −loss, the "
        "objective its steps descend, so λ1_H is the top eigenvalue of −H (−λ_min of the loss's "
        "Hessian) and meets the usual threshold; cosines and gradient noise do not change sign"
    )


def accumulation_advice(k: int, b: int, summed: bool) -> str:
    """The ``batch-size-accumulation`` warning: ``k`` backward passes reach the parameters per
    optimizer step while B = ``b`` is read from the logits (``summed``: a sum-reduced loss)."""
    uses = "η/B" + (" and the sharpness of the sum-reduced loss (B × the mean's)" * summed)
    message = (
        f"{k} backward passes reach the parameters per optimizer step; {uses} use the batch "
        f"size B = {b} read from the logits passed to step(). If this is gradient "
        f"accumulation, B is one micro-batch's: pass Agent(batch_size=...) the examples per "
        f"optimizer step ({k} × {b} = {k * b} if every micro-batch has {b})"
    )
    if summed:
        message += f", and sum_over={b} if each micro-batch's loss is divided by {k}"
    return message + (
        ". The extra passes of a step with several losses (a GAN's real and fake batches or "
        "its other player's loss, SAM's second pass) are not accumulation: then B is right "
        "and there is nothing to do"
    )


def startup_line(
    name: str, endpoint: Any, record: str | os.PathLike[str] | None, appending: bool, world: int
) -> str:
    """The console line an agent starts with: where it publishes, records and measures."""
    where = f"publishing on {endpoint}" if endpoint else "not publishing"
    if record:
        where += f", recording to {record}" + (
            " (appending: the file already holds a session; its runs stay apart by run id)"
            if appending
            else ""
        )
    where += f", measuring over {world} ranks" if world > 1 else ""
    return f"stiffmon: run '{name}' {where}"


def dist_rank() -> int:
    """The torch.distributed rank of this process; 0 if not distributed (or on any error)."""
    try:
        import torch.distributed as dist

        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    except Exception:
        return 0


HELLO_NAMES_MAX = 512 << 10
"""Most bytes of class names a ``hello`` carries (its header may hold 1 MiB): beyond, they are
left out (``meta.class_names_left_out``: how many) and the class-stiffness matrices, which name
their rows, carry those of the probe's classes."""


def hello_fields(
    name: str,
    model: nn.Module,
    optimizer: dict[str, Any],
    batch_size: int | None,
    class_names: Sequence[str] | None,
    probe: ProbeSet | None,
    endpoint: Any,
    record: str | os.PathLike[str] | None,
    held_by: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """The ``hello`` fields: who runs, the model size, the optimizer config, the probe sizes.

    ``param_count`` is the count the measurements cover (:func:`measured_param_count` with
    ``held_by``, the optimizer): a GAN's two runs on one module count their own player's
    parameters; where that is not the whole model's trainable count, ``meta``'s
    ``model_param_count`` holds the latter.
    """
    names = tuple(class_names or (probe.class_names if probe else ()))
    n_params = measured_param_count(model, held_by)
    n_model = sum(q.numel() for q in model.parameters() if q.requires_grad)
    meta: dict[str, Any] = {"endpoint": str(endpoint) if endpoint else None}
    if sum(len(n.encode()) + 4 for n in names) > HELLO_NAMES_MAX:  # the header's 1 MiB limit
        meta["class_names_left_out"] = len(names)  # the class matrices name their rows
        names = ()
    if record:
        meta["record"] = str(record)
    if n_model != n_params:
        meta["model_param_count"] = n_model
    return {
        "name": name,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "param_count": n_params,
        "optimizer": optimizer,
        "batch_size": batch_size,
        "class_names": names,
        "probe_train": probe.n_train if probe else 0,
        "probe_val": (probe.n - probe.n_train) if probe else 0,
        "agent_version": __version__,
        "meta": meta,
    }


def probe_notes(
    probe: ProbeSet | None,
    distance_layers: Sequence[str] = (),
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> list[tuple[str, str]]:
    """``(code, message)`` of the info events a probe calls for at the start: a probe whose
    targets are not class labels gets no class stiffness, and one whose inputs are not one
    floating-point tensor no stiffness-vs-distance curve (unless layers are named); the rest is
    measured. With the ``model``: its BatchNorm or Dropout layers are measured in eval mode
    (:func:`eval_mode_note`), its embeddings with ``scale_grad_by_freq=True`` rescale their
    backward (:func:`~stiffmon_agent.freq_scaled.freq_scaling_note`); with the ``optimizer``:
    ``maximize=True`` (:func:`maximize_note`)."""
    if probe is None:
        return []
    out = []
    if (ascent := maximizes(optimizer)) is not False:
        out.append(("maximize", maximize_note(ascent)))
    if model is not None and (note := eval_mode_note(model)):
        out.append(("eval-mode", note))
    if model is not None and (note := freq_scaling_note(model)):  # a backward not a gradient
        out.append(("grad-scale-by-freq", note))
    if probe.labels is None:  # why, and the class_target= that would give them
        out.append(("no-class-labels", no_class_note(probe.targets, probe.val_left_out)))
    x, _ = probe.train()
    if not distance_layers and not (isinstance(x, torch.Tensor) and x.is_floating_point()):
        out.append(
            (
                "no-distance-curve",
                "no stiffness-vs-distance curve: the probe inputs are not one floating-point "
                "tensor (token ids, a tuple or a dict), so there is no input-space distance; "
                "pass distance_layers=[...] for curves in a layer's activation space",
            )
        )
    return out


def eval_mode_note(model: nn.Module) -> str | None:
    """What measuring in eval mode changes for ``model``'s layers, or None if nothing.

    The measurements run the probe in eval mode: BatchNorm with running statistics uses them
    and Dropout (p > 0) is off, so the geometry is the evaluation network's, not that of the
    training steps (batch statistics, random masks). BatchNorm without running statistics
    (``track_running_stats=False``) normalises over the batch in eval mode too: the probe's
    examples are coupled. Only the kinds present are named.
    """
    bn = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracked = any(m.track_running_stats for m in bn)
    untracked = any(not m.track_running_stats for m in bn)
    dropout = any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())
    said, then = [], []
    if tracked:
        said.append("BatchNorm uses its running statistics")
        then.append("batch statistics")
    if dropout:
        said.append("Dropout is off")
        then.append("dropout")
    parts = []
    if said:
        parts.append(
            f"{' and '.join(said)} (as in evaluation; the training steps use {' and '.join(then)})"
        )
    if untracked:
        parts.append(
            "BatchNorm without running statistics normalises over the probe's examples: "
            "the per-example losses are coupled"
        )
    return f"measured in eval mode: {'; '.join(parts)}" if parts else None


def register_locally(run_id: str, name: str, endpoint: Any) -> str | None:
    """Register the run in the local registry; its id, or None (with a warning) if that failed."""
    try:
        register(
            RunEntry(
                run_id,
                name,
                str(endpoint),
                os.getpid(),
                socket.gethostname(),
                time.time(),
            )
        )
    except OSError as exc:
        log.warning(f"{speaker(name)}: could not register the run locally: {exc}")
        return None
    return run_id


def start_publisher(
    run_id: str,
    endpoint: str | None,
    record: str | os.PathLike[str] | None,
    fsync: Any,
    queue_size: int,
    max_scalar_history: int,
    curve_keys: str | os.PathLike[str] | CurveKeys | None,
) -> Publisher:
    """The run's publisher, with the CURVE keys loaded from a directory if one is given."""
    keys = (
        load_curve_server(curve_keys) if isinstance(curve_keys, str | os.PathLike) else curve_keys
    )
    return Publisher(
        run_id,
        endpoint=endpoint,
        record=record,
        fsync=fsync,
        queue_size=queue_size,
        max_scalar_history=max_scalar_history,
        curve=keys,
        warn=log.warning,
    )
