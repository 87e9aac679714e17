"""An agent with 1000 classes sends class-stiffness matrices over the probe's classes, named, and
never writes a frame its readers refuse: a message over the limits is dropped with an event that
names it, and the recording stays readable."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from stiffmon import protocol as p
from stiffmon.protocol import codec
from tests.agent.metrics.reference import loop_gradients
from tests.agent.recording import EVERY_STEP, close_and_read, events, offline_agent, train_step

K = 1000


def setup(
    n: int, classes: tuple[int, ...] = (3, 500, 999, 7, 500, 3)
) -> tuple[nn.Module, torch.Tensor, torch.Tensor, list[str]]:
    """A model with K logits and a probe of ``n`` examples of ``classes`` in turn."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, K)).double()
    x = torch.randn(n, 5, dtype=torch.float64)
    y = torch.tensor([classes[i % len(classes)] for i in range(n)])
    return model, x, y, [f"n{i:08d}" for i in range(K)]


def run(
    rec: Path, n: int, classes: tuple[int, ...] = (3, 500, 999, 7, 500, 3)
) -> tuple[list[p.Message], nn.Module, torch.Tensor, torch.Tensor]:
    """One step, measured after it: the messages and the model, probe inputs and labels."""
    model, x, y, names = setup(n, classes)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    settings = EVERY_STEP | {"sharpness_every": "never", "density_every": "never"}
    agent = offline_agent(model, loss_fn, opt, rec, probe=(x, y), class_names=names, **settings)
    train_step(agent, opt, loss_fn(model(x), y))
    return close_and_read(agent, rec), model, x, y


def test_the_class_matrix_is_over_the_probe_s_classes_with_their_names(tmp_path: Path) -> None:
    msgs, model, x, y = run(tmp_path / "r.stiff", 12)
    (m,) = [m for m in msgs if isinstance(m, p.Matrix) and m.name == "stiffness/cos/train-train"]
    present = [3, 7, 500, 999]
    assert m.data.shape == (4, 4)  # not 1000 × 1000 of which 12 cells have pairs
    assert m.row_labels == m.col_labels == tuple(f"n{c:08d}" for c in present)
    g = loop_gradients(model, x, y, nn.CrossEntropyLoss())
    norm = g.norm(dim=1)
    for a, ca in enumerate(present):
        for b, cb in enumerate(present):
            pairs = [
                float(g[i] @ g[j] / (norm[i] * norm[j]))
                for i in range(12)
                for j in range(12)
                if i != j and int(y[i]) == ca and int(y[j]) == cb
            ]
            want = sum(pairs) / len(pairs) if pairs else math.nan
            got = float(m.data[a, b])
            assert (math.isnan(got) and math.isnan(want)) or abs(got - want) < 1e-6, (ca, cb)


def test_a_message_over_the_frame_limit_is_dropped_with_an_event_and_the_file_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the limit lowered under a 7 × 7 float64 matrix (392 bytes), every class matrix is
    refused by the encoder (a reader would refuse the file: before, the agent recorded it
    anyway); the smaller messages go on."""
    monkeypatch.setattr(codec, "MAX_BUFFER_BYTES", 300)
    with pytest.raises(ValueError, match="over the 300-byte limit every reader enforces"):
        p.encode(
            p.Matrix(
                run="r",
                seq=1,
                step=0,
                t=0.0,
                name="m",
                data=torch.zeros(7, 7, dtype=torch.float64).numpy(),
            )
        )
    msgs = run(tmp_path / "r.stiff", 14, tuple(range(7)))[0]  # read with the readers' limit
    assert not [m for m in msgs if isinstance(m, p.Matrix)]
    dropped = events(msgs, "message-dropped")
    names = {e.attrs["name"] for e in dropped}
    assert names >= {"stiffness/cos/train-train", "stiffness/sign/train-train"}
    assert all(e.level == "warning" and "over the 300-byte limit" in e.message for e in dropped)
    assert any(
        isinstance(m, p.Scalars) and "stiffness/cos/train-train/within" in m.names for m in msgs
    )
