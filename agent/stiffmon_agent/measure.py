"""What the agent measures: metric functions composed into wire messages (no sockets here).

Message names (the monitor relies on them):

* ``matrix`` ``stiffness/{cos,sign}/{train-train,train-val,val-val}``: class stiffness, with
  ``attrs`` ``within`` and ``between``;
* ``scalars`` (one message per measurement) with ``stiffness/{cos,sign}/<block>/{within,between}``,
  ``noise/{trace_k,lambda1_k,trace_sigma,grad_sq,b_simple,conditioning}``, the gradient tests
  ``noise/{norm_test,inner_product_test,orthogonality_test}``, ``noise/suggested_batch/<test>``,
  ``noise/theta/<test>`` (:mod:`~stiffmon_agent.measure_curvature`), ``xi/<space>`` and
  ``layer-stiffness/<layer>`` (mean cosine stiffness of train pairs i ≠ j from that layer's block);
* ``spectrum`` ``grad-cov`` (top eigenvalues of the gradient covariance K);
* ``curve`` ``stiffness-distance/<space>`` (space = ``input`` or a layer name), ``attrs.xi``;
* after a sharpness measurement, ``spectrum`` ``hessian`` and ``scalars``
  ``sharpness/{lambda1_h,threshold,hvps}`` (threshold NaN where none applies).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from stiffmon import protocol as p
from stiffmon_agent.measure_curvature import gradient_test_scalars
from stiffmon_agent.metrics import (
    capture_activations,
    cosine_stiffness,
    gradient_noise,
    hessian_eigen,
    pairwise_distances,
    per_example_gram,
    sign_stiffness,
    stability_threshold_for,
    stiffness_blocks,
    stiffness_vs_distance,
)
from stiffmon_agent.metrics.probe import Batch, ForwardFn, LossFn, batch_size, take
from stiffmon_agent.publisher import Outgoing

BLOCKS = ("train-train", "train-val", "val-val")


@dataclass(frozen=True)
class ProbeSet:
    """The fixed probe: train part first, then the optional validation part.

    Attributes:
        inputs: Joint inputs (train ∪ val), examples along dim 0.
        targets: Joint targets.
        n_train: Number of train examples (the first ``n_train``).
        labels: Integer class labels (N,) if the targets are class labels, else None.
        num_classes: Number of classes (when ``labels`` is set).
        class_names: Names of the classes, if known.
    """

    inputs: Batch
    targets: Batch
    n_train: int
    labels: Tensor | None
    num_classes: int
    class_names: tuple[str, ...]

    @property
    def n(self) -> int:
        return batch_size(self.targets)

    def train(self) -> tuple[Batch, Batch]:
        sl = slice(0, self.n_train)
        return take(self.inputs, sl), take(self.targets, sl)


def make_probe(
    train: tuple[Batch, Batch],
    val: tuple[Batch, Batch] | None,
    device: torch.device | None,
    num_classes: int | None,
    class_names: Sequence[str] | None,
) -> ProbeSet:
    """Concatenate the train and val probes, move them to ``device`` and read the labels."""

    def move(t: Any) -> Any:
        return t.detach().to(device) if isinstance(t, Tensor) else t

    xs, ys = tree_map(move, train[0]), tree_map(move, train[1])
    n_train = batch_size(ys)
    if val is not None:
        vx, vy = tree_map(move, val[0]), tree_map(move, val[1])
        xs = tree_map(lambda a, b: torch.cat([a, b]), xs, vx)
        ys = tree_map(lambda a, b: torch.cat([a, b]), ys, vy)
    labels = ys if isinstance(ys, Tensor) and ys.dim() == 1 and not ys.is_floating_point() else None
    names = tuple(class_names or ())
    k = num_classes or (len(names) if names else 0)
    if labels is not None and labels.numel():
        k = max(k, int(labels.max()) + 1)
    return ProbeSet(xs, ys, n_train, labels, k, names)


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
) -> list[Outgoing]:
    """Stiffness, gradient noise, gradient tests, stiffness-vs-distance from one Gram matrix."""
    t = time.time()
    gram = per_example_gram(
        model, probe.inputs, probe.targets, loss_fn, forward=forward, chunk_size=chunk_size
    )
    g = gram.total.detach().double().cpu()
    out: list[Outgoing] = []
    scalars: dict[str, float] = {}
    nt = probe.n_train
    s_cos = cosine_stiffness(g)
    labels = probe.labels.cpu() if probe.labels is not None else None
    names = probe.class_names if len(probe.class_names) == probe.num_classes else ()
    if labels is not None:
        for kind, s in (("cos", s_cos), ("sign", sign_stiffness(g))):
            blocks = stiffness_blocks(s, labels, nt, probe.num_classes)
            for block_name, cs in zip(
                BLOCKS, (blocks.train_train, blocks.train_val, blocks.val_val), strict=True
            ):
                if cs is None:
                    continue
                name = f"stiffness/{kind}/{block_name}"
                out.append(
                    Outgoing(
                        p.Matrix,
                        step,
                        t,
                        {
                            "name": name,
                            "data": cs.matrix.numpy(),
                            "row_labels": names,
                            "col_labels": names,
                            "attrs": {"within": _json(cs.within), "between": _json(cs.between)},
                        },
                    )
                )
                scalars[f"{name}/within"] = cs.within
                scalars[f"{name}/between"] = cs.between
    if nt >= 2:
        noise = gradient_noise(g[:nt, :nt], k=noise_k)
        scalars.update(
            {
                "noise/trace_k": noise.trace_k,
                "noise/lambda1_k": noise.lambda1,
                "noise/trace_sigma": noise.trace_sigma,
                "noise/grad_sq": noise.grad_sq_unbiased,
                "noise/b_simple": noise.b_simple,
                "noise/conditioning": float(noise.conditioning[-1])
                if noise.conditioning.numel()
                else math.nan,
            }
        )
        theta_norm, theta_inner, nu_ortho = batch_test_theta
        scalars.update(
            gradient_test_scalars(
                g[:nt, :nt], theta_norm=theta_norm, theta_inner=theta_inner, nu_ortho=nu_ortho
            )
        )
        out.append(
            Outgoing(
                p.Spectrum,
                step,
                t,
                {"name": "grad-cov", "values": noise.eigenvalues.numpy(), "attrs": {"n": nt}},
            )
        )
    train_cos = s_cos[:nt, :nt]
    off = ~torch.eye(nt, dtype=torch.bool)
    for layer, block in gram.layers.items():
        lc = cosine_stiffness(block.detach().double().cpu()[:nt, :nt])[off]
        lc = lc[~torch.isnan(lc)]
        scalars[f"layer-stiffness/{layer}"] = float(lc.mean()) if lc.numel() else math.nan
    spaces: dict[str, Tensor] = {}
    train_x, _ = probe.train()
    if isinstance(train_x, Tensor) and train_x.is_floating_point():
        spaces["input"] = train_x.detach().double().cpu()
    if distance_layers:
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
) -> tuple[list[Outgoing], Tensor]:
    """λ1_H (and top-k) on the train probe, warm-started; returns messages and eigenvectors."""
    t = time.time()
    x, y = probe.train()
    res = hessian_eigen(
        model,
        x,
        y,
        loss_fn,
        k=k,
        warm_start=warm_start,
        tol=tol,
        max_hvps=max_hvps,
        forward=forward,
        chunk_size=chunk_size,
        generator=generator,
    )
    threshold = stability_threshold_for(optimizer) if optimizer is not None else None
    values = res.eigenvalues.detach().double().cpu()
    lam = float(values[0]) if values.numel() else math.nan
    thr = threshold.value if threshold is not None and threshold.value is not None else math.nan
    out = [
        Outgoing(
            p.Spectrum,
            step,
            t,
            {
                "name": "hessian",
                "values": values.numpy(),
                "attrs": {
                    "hvps": res.matvecs,
                    "converged": res.converged,
                    "threshold_rule": threshold.rule
                    if threshold is not None
                    else "none: no optimizer",
                },
            },
        ),
        Outgoing(
            p.Scalars,
            step,
            t,
            {
                "values_names": ["sharpness/lambda1_h", "sharpness/threshold", "sharpness/hvps"],
                "values_raw": [lam, thr, float(res.matvecs)],
            },
        ),
    ]
    return out, res.eigenvectors.detach()


def _json(x: float) -> float | None:
    return x if math.isfinite(x) else None
