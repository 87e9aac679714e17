"""``class_target=``: class stiffness for structured probe targets (a dict, a multi-task tuple,
or a callable picking the class indices), checked against a float64 brute force.

The reference: per-example gradients g_i = ∇_θ L_i from one backward pass each (float64), the
pairwise cosine S_ij = g_i·g_j / (‖g_i‖ ‖g_j‖) and sign S_ij = sign(g_i·g_j), and the class
stiffness C[a, b] = mean over i ∈ a, j ∈ b, i ≠ j of S_ij by a plain double loop.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from stiffmon import protocol as p
from tests.agent.recording import close_and_read, events, offline_agent, train_step

C = 3  # classes
BOX = 4  # regression outputs per example


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, C + BOX)).double()


def _data(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    label = torch.arange(n) % C
    box = torch.randn(n, BOX, generator=g, dtype=torch.float64)
    return x, label, box


def _parts(y: Any) -> tuple[Tensor, Tensor]:
    """(label, box) of dict or tuple targets."""
    return (y["label"], y["bbox"]) if isinstance(y, dict) else (y[1], y[0])


def multitask_loss(out: Tensor, y: Any) -> Tensor:
    """Per-example CE on the class logits + squared error on the box outputs, shape (N,)."""
    label, box = _parts(y)
    ce = nn.functional.cross_entropy(out[:, :C], label, reduction="none")
    return ce + ((out[:, C:] - box) ** 2).sum(dim=1)


def _targets(label: Tensor, box: Tensor, kind: str) -> Any:
    return (box, label) if kind == "tuple" else {"label": label, "bbox": box}


def _reference(model: nn.Module, x: Tensor, y: Any, n: int) -> Tensor:
    """(n, P) per-example gradients, one backward pass each, float64."""
    rows = []
    for i in range(n):
        yi = {k: v[i : i + 1] for k, v in y.items()} if isinstance(y, dict) else (
            y[0][i : i + 1], y[1][i : i + 1])  # fmt: skip
        model.zero_grad()
        multitask_loss(model(x[i : i + 1]), yi).sum().backward()
        rows.append(torch.cat([q.grad.reshape(-1) for q in model.parameters()]).clone())
    return torch.stack(rows)


def _class_matrix(g_rows: Tensor, g_cols: Tensor, lr: Tensor, lc: Tensor, same: bool, kind: str):
    """C[a, b] by a double loop over the pairs (i ≠ j within one set)."""
    out = torch.full((C, C), math.nan, dtype=torch.float64)
    for a in range(C):
        for b in range(C):
            vals = []
            for i in range(g_rows.shape[0]):
                for j in range(g_cols.shape[0]):
                    if lr[i] != a or lc[j] != b or (same and i == j):
                        continue
                    dot = float(g_rows[i] @ g_cols[j])
                    if kind == "cos":
                        vals.append(dot / float(g_rows[i].norm() * g_cols[j].norm()))
                    else:
                        vals.append(math.copysign(1.0, dot) if dot != 0 else 0.0)
            if vals:
                out[a, b] = sum(vals) / len(vals)
    return out


def _run(tmp_path: Path, kind: str, class_target: Any) -> tuple[list[Any], nn.Module, Any]:
    model = _model()
    x, label, box = _data(9, 1)
    xv, lv, bv = _data(6, 2)
    y, yv = _targets(label, box, kind), _targets(lv, bv, kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = tmp_path / f"{kind}.stiff"
    agent = offline_agent(
        model, multitask_loss, opt, rec, probe=(x, y), val_probe=(xv, yv),
        class_target=class_target, gram_every=1, sharpness_every="never", overhead_cap=None,
    )  # fmt: skip
    train_step(agent, opt, multitask_loss(model(x), y).mean())
    return close_and_read(agent, rec), model, (x, y, xv, yv)


@pytest.mark.parametrize(
    ("kind", "class_target"),
    [
        ("dict", "label"),
        ("tuple", 1),
        ("tuple", -1),
        ("dict", lambda y: y["label"]),
    ],
    ids=["dict-key", "tuple-index", "tuple-negative-index", "callable"],
)
def test_class_stiffness_of_structured_targets_matches_a_float64_loop(
    tmp_path: Path, kind: str, class_target: Any
) -> None:
    """Every block (train-train, train-val, val-val) of the cosine and sign class stiffness
    equals the brute-force loop, to float64 round-off, and within / between are its diagonal
    and off-diagonal means."""
    msgs, model, (x, y, xv, yv) = _run(tmp_path, kind, class_target)
    mats = {m.name: m for m in msgs if isinstance(m, p.Matrix)}
    g, gv = _reference(model, x, y, 9), _reference(model, xv, yv, 6)
    lt, lv = _parts(y)[0], _parts(yv)[0]
    worst = 0.0
    for kind_s in ("cos", "sign"):
        for block, (gr, gc, lr, lc, same) in {
            "train-train": (g, g, lt, lt, True),
            "train-val": (g, gv, lt, lv, False),
            "val-val": (gv, gv, lv, lv, True),
        }.items():
            ref = _class_matrix(gr, gc, lr, lc, same, kind_s)
            ours = torch.as_tensor(mats[f"stiffness/{kind_s}/{block}"].data, dtype=torch.float64)
            err = float((ours - ref).abs().max() / ref.abs().max())
            worst = max(worst, err)
            assert err < 1e-10, (kind_s, block, ours, ref)
            within = float(ref.diagonal().mean())
            between = float(ref[~torch.eye(C, dtype=torch.bool)].mean())
            attrs = mats[f"stiffness/{kind_s}/{block}"].attrs
            assert attrs["within"] == pytest.approx(within, rel=1e-10, abs=1e-12)
            assert attrs["between"] == pytest.approx(between, rel=1e-10, abs=1e-12)
    print(f"class stiffness ({kind}, {class_target!r}): max rel err vs float64 loop {worst:.1e}")
    assert not events(msgs, "no-class-labels")


@pytest.mark.parametrize(
    ("kind", "class_target", "says"),
    [
        ("dict", "labels", "class_target='labels' is not a key of the probe's targets"),
        ("dict", 0, "class_target=0 is an index, but the probe's targets are a dict"),
        ("tuple", 2, "class_target=2 is out of range"),
        ("tuple", "label", "class_target='label' is a key, but the probe's targets are a tuple"),
        ("dict", "bbox", "selects a (9, 4) float64 tensor, not the class indices"),
        ("dict", lambda y: y["nope"], "failed on the probe's targets"),
        ("dict", 1.5, "class_target must be a key of dict targets"),
    ],
)
def test_a_bad_class_target_raises_at_construction(
    tmp_path: Path, kind: str, class_target: Any, says: str
) -> None:
    """A key, index or callable that names no class indices raises when the agent is made
    (not at the first measurement), saying what the targets hold."""
    model = _model()
    x, label, box = _data(9, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises((ValueError, TypeError), match="class_target") as info:
        offline_agent(
            model, multitask_loss, opt, tmp_path / "bad.stiff",
            probe=(x, _targets(label, box, kind)), class_target=class_target,
        )  # fmt: skip
    assert says in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("kind", "names"),
    [("dict", "pass Agent class_target='label'"), ("tuple", "pass Agent class_target=1")],
)
def test_structured_targets_without_class_target_say_why_and_name_it(
    tmp_path: Path, kind: str, names: str
) -> None:
    """Without ``class_target`` there is no class stiffness, and an info event says why
    (the targets' kind) and names the ``class_target=`` that gives it; the rest goes on."""
    model = _model()
    x, label, box = _data(9, 1)
    y = _targets(label, box, kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = tmp_path / "none.stiff"
    agent = offline_agent(
        model, multitask_loss, opt, rec, probe=(x, y), gram_every=1,
        sharpness_every="never", overhead_cap=None,
    )  # fmt: skip
    train_step(agent, opt, multitask_loss(model(x), y).mean())
    msgs = close_and_read(agent, rec)
    (note,) = events(msgs, "no-class-labels")
    assert note.level == "info" and names in note.message, note.message
    assert note.message.startswith("no class stiffness: the probe's targets are a ")
    assert not any(isinstance(m, p.Matrix) for m in msgs)
    assert any(isinstance(m, p.Scalars) and "noise/trace_k" in m.names for m in msgs)


def test_one_hot_targets_get_class_stiffness_from_a_callable(tmp_path: Path) -> None:
    """One-hot float targets are no class labels; ``class_target=lambda y: y.argmax(1)`` gives
    the classes, and the matrix is the loop's; without it the note names class_target=."""
    model = _model()
    x, label, _ = _data(9, 1)
    onehot = nn.functional.one_hot(label, C + BOX).double()

    def loss(out: Tensor, y: Tensor) -> Tensor:
        return ((out - y) ** 2).sum(dim=1)

    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay put: θ is the start's
    msgs = {}
    for given in (None, lambda y: y.argmax(1)):
        rec = tmp_path / f"onehot-{given is None}.stiff"
        agent = offline_agent(
            model, loss, opt, rec, probe=(x, onehot), class_target=given, gram_every=1,
            sharpness_every="never", overhead_cap=None,
        )  # fmt: skip
        train_step(agent, opt, loss(model(x), onehot).mean())
        msgs[given is None] = close_and_read(agent, rec)
    assert (
        "class_target= a callable targets -> (N,) class indices"
        in events(msgs[True], "no-class-labels")[0].message
    )
    rows = []
    for i in range(9):
        model.zero_grad()
        loss(model(x[i : i + 1]), onehot[i : i + 1]).sum().backward()
        rows.append(torch.cat([q.grad.reshape(-1) for q in model.parameters()]).clone())
    g = torch.stack(rows)
    ref = _class_matrix(g, g, label, label, True, "cos")
    (mat,) = [
        m for m in msgs[False] if isinstance(m, p.Matrix) and m.name.startswith("stiffness/cos")
    ]
    ours = torch.as_tensor(mat.data, dtype=torch.float64)
    assert float((ours - ref).abs().max() / ref.abs().max()) < 1e-10
