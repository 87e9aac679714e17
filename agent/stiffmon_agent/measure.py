"""What the agent measures: metric functions composed into wire messages (no sockets here).

Message names (the monitor relies on them):

* ``matrix`` ``stiffness/{cos,sign}/{train-train,train-val,val-val}``: class stiffness, with
  ``attrs`` ``within`` and ``between``;
* ``scalars`` (one message per measurement) with ``stiffness/{cos,sign}/<block>/{within,between}``,
  ``noise/{trace_k,lambda1_k,trace_sigma,grad_sq,b_simple,conditioning}``, the gradient tests
  ``noise/{norm_test,inner_product_test,orthogonality_test}``, ``noise/suggested_batch/<test>``,
  ``noise/theta/<test>`` (:mod:`~stiffmon_agent.measure_curvature`), ``xi/<space>`` and
  ``layer-stiffness/<layer>`` (mean cosine stiffness of train pairs i ≠ j from that layer's block);
  probe examples with a zero gradient add an ``event`` ``zero-gradients``
  (:mod:`~stiffmon_agent.zero_gradients`);
* ``spectrum`` ``grad-cov`` (top eigenvalues of the gradient covariance K);
* ``curve`` ``stiffness-distance/<space>`` (space = ``input`` or a layer name), ``attrs.xi``;
* after a sharpness measurement, ``spectrum`` ``hessian`` (attrs ``threshold_rule``,
  ``threshold_group`` — the most restrictive param group, −1 if none — ``hvps``, ``converged``,
  ``objective``; ``symmetric`` and ``asymmetry`` where the solve checked that the
  Hessian-vector products are symmetric, i.e. on a cold start, with an ``event``
  ``hessian-asymmetric`` when they are not) and ``scalars``
  ``sharpness/{lambda1_h,threshold,hvps}`` (λ1_H of the training objective; threshold NaN where
  none applies or it cannot be known, with an ``event`` saying why); for Adam / AdamW / RMSprop
  also ``sharpness/{lambda1_precond,threshold_precond}`` (λ1(P⁻¹H) and (2+2β1)/((1−β1)η)) and
  ``spectrum`` ``hessian-precond``;
* a measurement due while the weights or the probe loss are not finite raises
  :class:`MeasurementSkipped` (the agent turns it into an ``event`` ``measurement-skipped``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from stiffmon import protocol as p
from stiffmon_agent.measure_curvature import noise_messages
from stiffmon_agent.metrics import (
    EigenResult,
    HessianOperator,
    StabilityThreshold,
    capture_activations,
    cosine_stiffness,
    diagonal_preconditioner,
    hessian_eigen,
    mean_pair_cosine,
    momentum_warmup,
    pairwise_distances,
    per_example_gram,
    preconditioned_threshold_for,
    sign_stiffness,
    stability_threshold_for,
    stiffness_blocks,
    stiffness_vs_distance,
    trainable_parameters,
)
from stiffmon_agent.metrics.alone_output import alone_loss_hint
from stiffmon_agent.metrics.chunk_coupling import chunking_changes_losses, stop_gradient_note
from stiffmon_agent.metrics.gram import GramResult
from stiffmon_agent.metrics.optimizer_kind import PRECONDITIONED, optimizer_kind
from stiffmon_agent.metrics.preconditioner import coupled_decay
from stiffmon_agent.metrics.probe import (
    Batch,
    ForwardFn,
    LossFn,
)
from stiffmon_agent.metrics.stiffness import class_labels_of_matrix
from stiffmon_agent.metrics.symmetry import asymmetry_message
from stiffmon_agent.outgoing import Outgoing
from stiffmon_agent.probe_check import check_finite
from stiffmon_agent.probe_set import MeasurementSkipped, ProbeSet, make_probe
from stiffmon_agent.sharpness_state import (
    CHUNKS_CHECK_EVERY,
    SharpnessState,
    check_products,
    objective_scale,
)
from stiffmon_agent.zero_gradients import zero_gradient_event

__all__ = [
    "BLOCKS",
    "MeasurementSkipped",
    "ProbeSet",
    "SharpnessState",
    "check_finite",
    "gram_messages",
    "make_probe",
    "sharpness_messages",
]

BLOCKS = ("train-train", "train-val", "val-val")


def gram_messages(
    model: nn.Module,
    loss_fn: LossFn,
    probe: ProbeSet,
    step: int,
    *,
    forward: ForwardFn | None = None,
    distance_layers: Sequence[str] = (),
    distance_bins: int = 20,
    noise_k: int = 5,
    chunk_size: int | None = 128,
    batch_test_theta: tuple[float, float, float] = (0.9, 0.9, 5.84),
    gram: GramResult | None = None,
    activations: dict[str, Tensor] | None = None,
) -> list[Outgoing]:
    """Stiffness, gradient noise, gradient tests, stiffness-vs-distance from one Gram matrix.

    ``gram`` and ``activations`` (of ``distance_layers`` on the train probe) are computed here
    unless given (the sharded measurement assembles them over the ranks).
    """
    t = time.time()
    if gram is None:
        gram = per_example_gram(
            model, probe.inputs, probe.targets, loss_fn, forward=forward, chunk_size=chunk_size
        )
    eps = torch.finfo(gram.total.dtype).eps  # the Gram's own rounding, before the cast
    g = gram.total.detach().double().cpu()
    if not bool(torch.isfinite(g).all()):  # finite weights and loss, overflowing gradients
        why = alone_loss_hint(model, probe.inputs, probe.targets, loss_fn, forward)
        if why is not None:  # not a diverging run: it never works, so the Gram stops
            raise ValueError(why)
        raise MeasurementSkipped(
            f"the probe's per-example gradients are not finite ({int((~torch.isfinite(g)).sum())}"
            f" of {g.numel()} Gram entries: the run is diverging)"
        )
    out: list[Outgoing] = [  # the runner says each once
        _event(step, t, "gram-fallback", f"per-example gradients: {note}", "warning")
        for note in gram.notes
    ]
    if (zero := zero_gradient_event(g, probe.n_train, step, t)) is not None:
        out.append(zero)  # cosine leaves their pairs out, sign counts them as 0
    scalars: dict[str, float] = {}
    nt = probe.n_train
    s_cos = cosine_stiffness(g)
    labels = probe.labels.cpu() if probe.labels is not None else None
    names = probe.class_names if len(probe.class_names) == probe.num_classes else ()
    if labels is not None:
        for kind, s in (("cos", s_cos), ("sign", sign_stiffness(g))):
            # over the probe's classes only (ImageNet-21k: 316 rows, not a 21,843² matrix)
            blocks = stiffness_blocks(s, labels, nt, probe.num_classes, compact=True)
            for block_name, cs in zip(
                BLOCKS, (blocks.train_train, blocks.train_val, blocks.val_val), strict=True
            ):
                if cs is None:
                    continue
                name = f"stiffness/{kind}/{block_name}"
                rows = class_labels_of_matrix(cs, names)
                out.append(
                    Outgoing(
                        p.Matrix,
                        step,
                        t,
                        {
                            "name": name,
                            "data": cs.matrix.numpy(),
                            "row_labels": rows,
                            "col_labels": rows,
                            "attrs": {"within": _json(cs.within), "between": _json(cs.between)},
                        },
                    )
                )
                scalars[f"{name}/within"] = cs.within
                scalars[f"{name}/between"] = cs.between
    noise_scalars, noise_out = noise_messages(g[:nt, :nt], step, t, noise_k, batch_test_theta, eps)
    scalars.update(noise_scalars)
    out += noise_out
    train_cos = s_cos[:nt, :nt]
    for layer, block in gram.layers.items():
        g_layer = block.detach()[:nt, :nt].double().cpu()
        # a submodule compiled with torch.compile: named as it is uncompiled
        name = ".".join(part for part in layer.split(".") if part != "_orig_mod") or "(root)"
        scalars[f"layer-stiffness/{name}"] = mean_pair_cosine(g_layer)
    spaces: dict[str, Tensor] = {}
    train_x, _ = probe.train()
    if isinstance(train_x, Tensor) and train_x.is_floating_point():
        spaces["input"] = train_x.detach().double().cpu()
    if distance_layers:
        acts = activations
        if acts is None:
            acts = capture_activations(model, train_x, list(distance_layers), forward=forward)
        spaces.update({k: v.double().cpu() for k, v in acts.items()})
    for space, feats in spaces.items():
        curve = stiffness_vs_distance(
            train_cos, pairwise_distances(feats), distance_bins, max_distance=2.0
        )
        out.append(
            Outgoing(
                p.Curve,
                step,
                t,
                {
                    "name": f"stiffness-distance/{space}",
                    "x": curve.centers.numpy(),
                    "y": curve.mean.numpy(),
                    "attrs": {"xi": curve.xi, "pairs": int(curve.counts.sum())},
                },
            )
        )
        scalars[f"xi/{space}"] = math.nan if curve.xi is None else curve.xi
    out.append(
        Outgoing(
            p.Scalars,
            step,
            t,
            {"values_names": list(scalars), "values_raw": list(scalars.values())},
        )
    )
    return out


def _event(step: int, t: float, code: str, message: str, level: str = "info") -> Outgoing:
    return Outgoing(
        p.Event, step, t, {"level": level, "code": code, "message": message, "attrs": {}}
    )


def sharpness_messages(
    model: nn.Module,
    loss_fn: LossFn,
    probe: ProbeSet,
    step: int,
    optimizer: torch.optim.Optimizer | None,
    *,
    forward: ForwardFn | None = None,
    warm_start: Tensor | None = None,
    k: int = 1,
    tol: float = 1e-2,
    max_hvps: int = 50,
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
    state: SharpnessState | None = None,
    train: tuple[Batch, Batch] | None = None,
    wrap: Callable[[HessianOperator], Callable[[Tensor], Tensor]] | None = None,
    groups: Sequence[dict[str, Any]] | None = None,
) -> tuple[list[Outgoing], Tensor]:
    """λ1_H (and top-k) of the training objective on the train probe, warm-started.

    The objective is the per-example mean for a mean-reduced loss and B × it for a sum-reduced
    one (B from ``state.batch_size``; unknown B: the per-example mean, a NaN threshold and an
    event). The threshold is the most restrictive param group's, at the learning rates of
    ``groups`` (those the step just taken used) or else the optimizer's current ones.
    For the preconditioned optimizers also λ1(P⁻¹H) against its preconditioned threshold.

    ``train`` is the examples this process computes (default: the train probe) and ``wrap``
    turns its Hessian operator into the H v solved for (sharded measurement:
    :class:`~stiffmon_agent.distributed.HvpLeader`).

    Returns:
        The messages (``spectrum`` ``hessian`` [and ``hessian-precond``], ``scalars``, and
        ``event`` messages for reasons not said before) and the warm-start block (Ritz
        vectors of the raw Hessian).
    """
    state = state if state is not None else SharpnessState(warm=warm_start)
    if warm_start is not None:
        state.warm = warm_start
    t = time.time()
    x, y = train if train is not None else probe.train()
    out: list[Outgoing] = []

    def note(code: str, message: str, level: str = "info", key: str | None = None) -> None:
        if (key or code) not in state.reported:  # each reason once
            state.reported.add(key or code)
            out.append(_event(step, t, code, message, level))

    scale, objective = objective_scale(loss_fn, state)
    scale_known = not math.isnan(scale)
    if not scale_known:
        scale = 1.0
        note(
            "threshold-unknown",
            "the loss is sum-reduced and the training batch size is unknown (pass "
            "batch_size= to Agent or the logits to step()): λ1_H is that of the per-example "
            "mean and no threshold is published",
            "warning",
        )
    common = {
        "k": k,
        "tol": tol,
        "max_hvps": max_hvps,
        "forward": forward,
        "chunk_size": chunk_size,
        "generator": generator,
        "scale": scale,
        "wrap": wrap,
    }
    check = state.measured % CHUNKS_CHECK_EVERY == 0 and "hessian-chunked" not in state.reported
    state.measured += 1
    if check:
        if (why := chunking_changes_losses(model, x, y, loss_fn, forward, chunk_size)) is not None:
            note("hessian-chunked", why, "warning")
    if state.measured == 1 and (why := stop_gradient_note(model, x, y, loss_fn, forward)):
        note("stop-gradient", why, "warning")

    def solve(
        which: str, preconditioner: Tensor | None = None, shift: Tensor | None = None
    ) -> EigenResult:
        """λ1 of H (``raw``) or P⁻¹H (``precond``), warm-started from the last measurement of
        the same operator, which keeps its own warm start and cold checks. A cold start's
        symmetry check (free) that fails is said once (D H D is symmetric exactly when H is)."""
        warm = state.warm if which == "raw" else state.warm_precond
        res = hessian_eigen(
            model,
            x,
            y,
            loss_fn,
            warm_start=warm,
            preconditioner=preconditioner,
            shift=shift,
            check_below=state.check_below(which) if warm is not None else None,
            **common,  # type: ignore[arg-type]
        )
        check_products(res, "λ1_H" if which == "raw" else "λ1(P⁻¹H)")
        if res.symmetry is not None and res.symmetry.symmetric is False:
            note("hessian-asymmetric", asymmetry_message(res.symmetry), "warning")
        if which == "raw":
            state.warm = res.warm_start.detach()
        else:
            state.warm_precond = res.warm_start.detach()
        state.note(which, res)
        return res

    def spectrum(name: str, res: EigenResult, thr: StabilityThreshold) -> Outgoing:
        attrs: dict[str, Any] = {
            "hvps": res.matvecs,
            "converged": res.converged,
            "threshold_rule": thr.rule,
            "threshold_group": thr.group if thr.group is not None else -1,
            "objective": objective,
        }
        if res.symmetry is not None:
            attrs["symmetric"] = res.symmetry.symmetric
            attrs["asymmetry"] = _json(res.symmetry.defect)
        values = res.eigenvalues.detach().double().cpu().numpy()
        return Outgoing(p.Spectrum, step, t, {"name": name, "values": values, "attrs": attrs})

    res = solve("raw")
    if optimizer is None:
        threshold = StabilityThreshold(None, "none: no optimizer")
    else:
        threshold = stability_threshold_for(optimizer, groups=groups)
    if not scale_known:
        threshold = StabilityThreshold(None, f"none: batch size unknown; {threshold.rule}")
    elif threshold.value is None:
        why = threshold.rule.removeprefix("none: ")
        note("threshold-none", f"no stability threshold on λ1_H: {why}", key=threshold.rule)
    names = ["sharpness/lambda1_h", "sharpness/threshold", "sharpness/hvps"]
    raw = [
        float(res.eigenvalues[0]) if res.eigenvalues.numel() else math.nan,
        threshold.value if threshold.value is not None else math.nan,
        float(res.matvecs),
    ]
    out.append(spectrum("hessian", res, threshold))
    if res.eigenvalues.numel() and res.lowest < -abs(float(res.eigenvalues[0])):
        note(
            "negative-curvature",
            f"the Hessian's most negative eigenvalue is at most {res.lowest:.3g}, larger in "
            f"magnitude than λ1_H = {float(res.eigenvalues[0]):.3g}: λ1_H is the largest "
            "eigenvalue (the one the stability threshold bounds), not the largest-magnitude "
            "one that PyHessian's power iteration reports; a negative eigenvalue is a saddle "
            "direction the loss falls along at any step size, no instability 2/η bounds",
        )
    kind = optimizer_kind(optimizer)  # a subclass that keeps its base's step: its base's rule
    if optimizer is not None and not kind.overridden and kind.rule in PRECONDITIONED:
        pthr = preconditioned_threshold_for(optimizer, groups)
        params = list(trainable_parameters(model).values())
        diag, why = diagonal_preconditioner(optimizer, params)
        lam_p, hvps_p = math.nan, 0
        if diag is None:
            note("precond-unknown", f"no preconditioned sharpness yet: {why}", key=f"precond:{why}")
        else:
            pres = solve("precond", diag, coupled_decay(optimizer, params))  # P⁻¹(H + wd)
            lam_p, hvps_p = float(pres.eigenvalues[0]), pres.matvecs
            out.append(spectrum("hessian-precond", pres, pthr))
        names += ["sharpness/lambda1_precond", "sharpness/threshold_precond"]
        early = momentum_warmup(optimizer, groups)
        if early:  # its spectrum still goes out (and warm-starts the next measurement)
            again = "precond-steady" in state.reported  # parameters added: t restarts at 1
            why = "again (parameters added to the optimizer)" if again else "yet"
            note("precond-warmup", f"no λ1(P⁻¹H) or threshold on it {why}: {early}")
        else:
            state.reported.discard("precond-warmup")
            state.reported.add("precond-steady")
        ok = scale_known and pthr.value is not None and not early
        raw += [math.nan if early else lam_p, pthr.value if ok else math.nan]  # type: ignore[list-item]
        raw[2] += hvps_p
    out.append(Outgoing(p.Scalars, step, t, {"values_names": names, "values_raw": raw}))
    return out, res.warm_start.detach()  # what state.warm holds


def _json(x: float) -> float | None:
    return x if math.isfinite(x) else None
