"""Probes whose targets are not one class index per example: what the agent shows for class
stiffness, and whether the other numbers are right.

Knowledge distillation (teacher probabilities, with or without hard labels), mixup / CutMix
probability rows with ``CrossEntropyLoss``, label smoothing, multi-label ``BCEWithLogitsLoss``,
per-pixel segmentation targets with ``ignore_index=255`` and a regression with a validation
probe. Class stiffness is shown where each example has a class the user names (hard labels
beside the probabilities with ``class_target=1``; the argmax of smoothed one-hot rows with
``class_target=lambda y: y.argmax(1)``), else a ``no-class-labels`` info event says what the
targets are and why no class is the example's. The references are float64 loops of my own:
per-example gradients g_i = ∇L_i one backward pass each, Tr K = (1/N) Σ ‖g_i − ḡ‖², the class
stiffness C[a, b] = mean over i ∈ a, j ∈ b, i ≠ j of cos(g_i, g_j) (or sign(g_i · g_j)), and
λ1_H the top eigenvalue of the dense Hessian of torch's own mean-reduced loss on the train probe.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stiffmon import protocol as p
from tests.agent.metrics.reference import dense_hessian_of
from tests.agent.recording import EXACT, close_and_read, events, last_scalar, offline_agent

C, N, NV = 4, 12, 8


def _mlp(out: int = C) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, out)).double()


class _Seg(nn.Module):
    """A two-layer fully convolutional net: (N, 2, H, W) -> (N, C, H, W) logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.c1, self.c2 = nn.Conv2d(2, 5, 3, padding=1), nn.Conv2d(5, C, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.c2(torch.tanh(self.c1(x)))


def _row(y: Any, i: int) -> Any:
    return tuple(t[i : i + 1] for t in y) if isinstance(y, tuple) else y[i : i + 1]


def _grads(model: nn.Module, x: Tensor, y: Any, per_example: Any) -> Tensor:
    """(n, P) per-example gradients ∇L_i, one backward pass each (float64)."""
    rows = []
    for i in range(x.shape[0]):
        gs = torch.autograd.grad(per_example(model(x[i : i + 1]), _row(y, i)), model.parameters())
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


def _trace_k(g: Tensor) -> float:
    return float(((g - g.mean(0)) ** 2).sum(1).mean())


def _class_matrix(gr: Tensor, gc: Tensor, lr: Tensor, lc: Tensor, same: bool, kind: str) -> Tensor:
    """C[a, b] by a double loop over the pairs (i ≠ j within one set)."""
    out = torch.full((C, C), math.nan, dtype=torch.float64)
    for a in range(C):
        for b in range(C):
            vals = []
            for i in range(gr.shape[0]):
                for j in range(gc.shape[0]):
                    if lr[i] != a or lc[j] != b or (same and i == j):
                        continue
                    dot = float(gr[i] @ gc[j])
                    cos = dot / float(gr[i].norm() * gc[j].norm())
                    vals.append(cos if kind == "cos" else math.copysign(1.0, dot) if dot else 0.0)
            if vals:
                out[a, b] = sum(vals) / len(vals)
    return out


def _record(tmp_path: Path, name: str, model: nn.Module, loss: Any, x: Tensor, y: Any, **kw: Any):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # θ stays the reference's
    rec = tmp_path / f"{name}.stiff"
    agent = offline_agent(model, loss, opt, rec, probe=(x, y), **(EXACT | kw))
    agent.step(torch.tensor(1.0))
    return close_and_read(agent, rec)


def _data() -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, 5, generator=g, dtype=torch.float64)
    xv = torch.randn(NV, 5, generator=g, dtype=torch.float64)
    lab, vlab = torch.arange(N) % C, torch.arange(NV) % C
    lam = torch.rand(N, 1, generator=g, dtype=torch.float64)
    perm = torch.randperm(N, generator=g)
    oh = F.one_hot(lab, C).double()
    teacher = torch.softmax(2 * torch.randn(N, C, generator=g, dtype=torch.float64), 1)
    return {
        "x": x,
        "xv": xv,
        "lab": lab,
        "vlab": vlab,
        "mixed": lam * oh + (1 - lam) * oh[perm],
        "teacher": teacher,
        "smoothed": oh * 0.9 + 0.1 / C,
        "onehot": oh,
        "multi": (torch.rand(N, C, generator=g) < 0.4).double(),
        "soft_binary": torch.where(lab % 2 == 0, 0.05, 0.95).double(),
        "reg": torch.randn(N, 2, generator=g, dtype=torch.float64),
        "reg_v": torch.randn(NV, 2, generator=g, dtype=torch.float64),
    }


def _soft_ce(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y, reduction="sum")


def _bce(out: Tensor, y: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(out, y, reduction="none").mean(1).sum()


@pytest.mark.parametrize(
    ("key", "loss", "per_example", "says"),
    [
        ("mixed", nn.CrossEntropyLoss(), _soft_ce, "probability rows that differ per example"),
        ("teacher", nn.CrossEntropyLoss(), _soft_ce, "a probe needs no mixing"),
        ("smoothed", nn.CrossEntropyLoss(), _soft_ce, "label-smoothed one-hot rows (each 0.925"),
        ("onehot", nn.CrossEntropyLoss(), _soft_ce, "one-hot rows: each example's class is its"),
        ("multi", nn.BCEWithLogitsLoss(), _bce, "multi-label 0/1 rows ("),
    ],
)
def test_probability_and_multi_label_rows_say_what_they_are(
    tmp_path: Path, key: str, loss: nn.Module, per_example: Any, says: str
) -> None:
    """(N, C) float targets: the event names the kind of rows and what class_target= gives
    (the argmax only where it is the class); no matrix; Tr K and λ1_H are the loop's."""
    d = _data()
    model, y = _mlp(), d[key]
    msgs = _record(tmp_path, key, model, loss, d["x"], y)
    (note,) = events(msgs, "no-class-labels")
    assert says in note.message, note.message
    argmax_hint = "class_target= a callable targets -> (N,) class indices, lambda y: y.argmax(1)"
    assert (argmax_hint in note.message) == (key in ("smoothed", "onehot")), note.message
    assert not any(isinstance(m, p.Matrix) for m in msgs)
    g = _grads(model, d["x"], y, per_example)
    ref_k = _trace_k(g)
    hess = dense_hessian_of(model, d["x"], lambda out: loss(out, y))
    ref_l = float(torch.linalg.eigvalsh(hess)[-1])
    ours_k, ours_l = last_scalar(msgs, "noise/trace_k"), last_scalar(msgs, "sharpness/lambda1_h")
    print(f"{key}: Tr K {ours_k:.12g} vs {ref_k:.12g}; λ1_H {ours_l:.12g} vs {ref_l:.12g}")
    assert ours_k == pytest.approx(ref_k, rel=1e-10)
    assert ours_l == pytest.approx(ref_l, rel=1e-8)


def test_mixup_rows_count_those_without_a_majority(tmp_path: Path) -> None:
    """The mixup event gives the range of each row's largest probability and how many rows
    have no majority class (largest ≤ 1/2), counted by hand."""
    d = _data()
    msgs = _record(tmp_path, "mixup", _mlp(), nn.CrossEntropyLoss(), d["x"], d["mixed"])
    top = d["mixed"].max(1).values
    (note,) = events(msgs, "no-class-labels")
    want = f"largest probability {float(top.min()):.3g} to {float(top.max()):.3g}, "
    want += f"{int((top <= 0.5).sum())} of {N} without a majority class"
    assert want in note.message, note.message


def test_smoothed_rows_grouped_by_argmax_match_the_loop(tmp_path: Path) -> None:
    """Label-smoothed rows with ``class_target=lambda y: y.argmax(1)`` (as the event says):
    every block of the cosine and sign class stiffness is the loop's over argmax classes."""
    d = _data()
    model = _mlp()
    yv = F.one_hot(d["vlab"], C).double() * 0.9 + 0.1 / C
    msgs = _record(
        tmp_path, "smoothed-argmax", model, nn.CrossEntropyLoss(), d["x"], d["smoothed"],
        val_probe=(d["xv"], yv), class_target=lambda y: y.argmax(1), sharpness_every="never",
    )  # fmt: skip
    assert not events(msgs, "no-class-labels")
    mats = {m.name: m for m in msgs if isinstance(m, p.Matrix)}
    g, gv = _grads(model, d["x"], d["smoothed"], _soft_ce), _grads(model, d["xv"], yv, _soft_ce)
    lt, lv = d["lab"], d["vlab"]
    for kind in ("cos", "sign"):
        for block, (gr, gc, lr, lc, same) in {
            "train-train": (g, g, lt, lt, True),
            "train-val": (g, gv, lt, lv, False),
            "val-val": (gv, gv, lv, lv, True),
        }.items():
            ref = _class_matrix(gr, gc, lr, lc, same, kind)
            ours = torch.as_tensor(mats[f"stiffness/{kind}/{block}"].data, dtype=torch.float64)
            assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-12, equal_nan=True), (kind, block)


def test_distillation_with_hard_labels_groups_by_them(tmp_path: Path) -> None:
    """KD targets (teacher probabilities, hard labels): the event without ``class_target``
    names index 1; with it the train-train class stiffness is the loop's over the hard labels
    and Tr K is the loop's."""
    d = _data()
    temp = 2.0

    def kd(out: Tensor, y: tuple[Tensor, Tensor]) -> Tensor:
        probs, hard = y
        kl = (probs * (probs.log() - F.log_softmax(out / temp, 1))).sum(1) * temp**2
        return 0.5 * kl + 0.5 * F.cross_entropy(out, hard, reduction="none")

    y = (d["teacher"], d["lab"])
    plain = _record(tmp_path, "kd-plain", _mlp(), kd, d["x"], y, sharpness_every="never")
    (note,) = events(plain, "no-class-labels")
    assert "pass Agent class_target=1 (the index of the class indices)" in note.message
    model = _mlp()
    msgs = _record(tmp_path, "kd", model, kd, d["x"], y, class_target=1, sharpness_every="never")
    g = _grads(model, d["x"], y, lambda o, t: kd(o, t).sum())
    for kind in ("cos", "sign"):
        ref = _class_matrix(g, g, d["lab"], d["lab"], True, kind)
        (mat,) = [
            m for m in msgs if isinstance(m, p.Matrix) and m.name == f"stiffness/{kind}/train-train"
        ]
        ours = torch.as_tensor(mat.data, dtype=torch.float64)
        assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-12, equal_nan=True), kind
    assert last_scalar(msgs, "noise/trace_k") == pytest.approx(_trace_k(g), rel=1e-10)


def test_mixup_tuple_of_two_label_parts_says_neither_is_the_class(tmp_path: Path) -> None:
    """(y_a, y_b, λ) mixup targets: two parts hold class indices; the event does not pick
    y_a as the class but says a mixed example belongs to no one class."""
    d = _data()
    lam = torch.rand(N, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    yb = d["lab"].roll(1)

    def mix(out: Tensor, y: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        ya, yb, lam = y
        ce = F.cross_entropy
        return lam * ce(out, ya, reduction="none") + (1 - lam) * ce(out, yb, reduction="none")

    msgs = _record(tmp_path, "mix-tuple", _mlp(), mix, d["x"], (d["lab"], yb, lam))
    (note,) = events(msgs, "no-class-labels")
    assert "class_target= one of the indices 0, 1" in note.message, note.message
    assert "a mixed example belongs to no one class" in note.message


def test_soft_binary_targets_say_how_to_group_by_the_nearer_class(tmp_path: Path) -> None:
    """A binary classifier's smoothed targets 0.05 / 0.95: named, with the threshold callable."""
    d = _data()
    model = _mlp(1)

    def bce(out: Tensor, y: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(out.reshape(-1), y, reduction="none")

    msgs = _record(tmp_path, "soft-binary", model, bce, d["x"], d["soft_binary"])
    (note,) = events(msgs, "no-class-labels")
    assert "a binary classifier's soft targets" in note.message
    assert "class_target=lambda y: (y.reshape(-1) > 0.5).long()" in note.message


def test_segmentation_targets_are_per_pixel_and_the_rest_is_right(tmp_path: Path) -> None:
    """(N, H, W) class indices with ignore_index=255: per-element, no class per example; Tr K
    is the loop's with L_i = Σ_t c_it ℓ_it / c̄ and λ1_H that of torch's own mean over the
    counted pixels."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(N, 2, 3, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N, 3, 3), generator=g)
    y[torch.rand(N, 3, 3, generator=g) < 0.3] = 255
    loss = nn.CrossEntropyLoss(ignore_index=255)
    model = _Seg().double()
    msgs = _record(tmp_path, "seg", model, loss, x, y)
    (note,) = events(msgs, "no-class-labels")
    assert "per-element class indices (3×3 per example: pixels or tokens)" in note.message
    c_bar = float((y != 255).double().sum((1, 2)).mean())

    def per_example(out: Tensor, t: Tensor) -> Tensor:
        return F.cross_entropy(out, t, ignore_index=255, reduction="sum") / c_bar

    ref_k = _trace_k(_grads(model, x, y, per_example))
    ref_l = float(torch.linalg.eigvalsh(dense_hessian_of(model, x, lambda o: loss(o, y)))[-1])
    assert last_scalar(msgs, "noise/trace_k") == pytest.approx(ref_k, rel=1e-10)
    assert last_scalar(msgs, "sharpness/lambda1_h") == pytest.approx(ref_l, rel=1e-8)


def test_a_regression_val_probe_is_left_out_and_said_so(tmp_path: Path) -> None:
    """A regression with a val probe: no class labels, so the val probe is used by nothing;
    the event says its examples are left out (not measured), the hello counts 0 val examples,
    and every number equals the run without a val probe and the train-only loop."""
    d = _data()
    loss = nn.MSELoss()
    runs = {}
    for with_val in (True, False):
        model = _mlp(2)
        val = {"val_probe": (d["xv"], d["reg_v"])} if with_val else {}
        runs[with_val] = _record(tmp_path, f"reg-{with_val}", model, loss, d["x"], d["reg"], **val)
    (note,) = events(runs[True], "no-class-labels")
    assert f"the val probe's {NV} examples are left out (not measured)" in note.message
    assert (
        "per class pair" in note.message and "with class_target= they are measured" in note.message
    )
    assert "val probe" not in events(runs[False], "no-class-labels")[0].message
    hello = runs[True][0]
    assert hello.kind == "hello" and hello.probe_val == 0 and hello.probe_train == N
    g = _grads(_mlp(2), d["x"], d["reg"], lambda o, t: F.mse_loss(o, t))
    assert last_scalar(runs[True], "noise/trace_k") == pytest.approx(_trace_k(g), rel=1e-10)
    for name in ("noise/trace_k", "sharpness/lambda1_h", "layer-stiffness/0", "xi/input"):
        a, b = last_scalar(runs[True], name), last_scalar(runs[False], name)
        assert a == b or (math.isnan(a) and math.isnan(b)), name
