"""``class_target=`` through the framework integrations: a bad key or index raises when the
callback is made (not when training starts, let alone at a measurement), a good one passes
through to the agent, whose class stiffness then matches a float64 per-example loop."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from stiffmon import protocol as p
from stiffmon.session import read_session
from stiffmon_agent.integrations._common import check_options

N, C = 9, 3


def _probe() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, 4, generator=g, dtype=torch.float64)
    return x, {"label": torch.arange(N) % C, "weight": torch.rand(N, generator=g)}


def test_check_options_refuses_a_bad_class_target_at_once() -> None:
    probe = _probe()
    with pytest.raises(ValueError, match="class_target='labels' is not a key"):
        check_options({"probe": probe, "class_target": "labels"})
    with pytest.raises(ValueError, match=r"selects a \(9,\) float32 tensor"):
        check_options({"probe": probe, "class_target": "weight"})
    with pytest.raises(TypeError, match="class_target must be"):
        check_options({"probe": probe, "class_target": 2.0})
    assert check_options({"probe": probe, "class_target": "label"})["class_target"] == "label"


def test_lightning_callback_refuses_a_bad_class_target_when_made() -> None:
    pytest.importorskip("lightning.pytorch")
    from stiffmon_agent.integrations.lightning import StiffmonCallback

    with pytest.raises(ValueError, match="class_target=5 is an index, but the probe's targets"):
        StiffmonCallback(probe=_probe(), class_target=5)


def test_accelerate_agent_refuses_a_bad_class_target_when_made() -> None:
    pytest.importorskip("accelerate")
    from accelerate import Accelerator

    from stiffmon_agent.integrations.accelerate import AccelerateAgent

    model = nn.Linear(4, C).double()
    with pytest.raises(ValueError, match="class_target='nope' is not a key"):
        AccelerateAgent(
            Accelerator(cpu=True), model, nn.CrossEntropyLoss(), None, probe=_probe(),
            class_target="nope", endpoint="", registry=False,
        )  # fmt: skip


def test_transformers_callback_checks_the_split_labels() -> None:
    """The Trainer callback splits ``labels`` off the probe batch; a key for the labels tensor
    raises at once, and a callable on them is accepted."""
    pytest.importorskip("transformers")
    from stiffmon_agent.integrations.transformers import StiffmonCallback

    batch = {"input_ids": torch.zeros(N, 5, dtype=torch.long), "labels": torch.arange(N) % C}
    with pytest.raises(
        ValueError, match=r"is a key, but the probe's targets are a \(9,\) int64 tensor"
    ):
        StiffmonCallback(probe=batch, class_target="label")
    StiffmonCallback(probe=batch, class_target=lambda y: y)


def _loss(out: torch.Tensor, y: dict[str, torch.Tensor]) -> torch.Tensor:
    ce = nn.functional.cross_entropy(out, y["label"], reduction="none")
    return ce * (1 + y["weight"].to(out.dtype))


def test_lightning_passes_class_target_to_the_agent(tmp_path: Path) -> None:
    """A Lightning run with dict targets and ``class_target="label"``: the train-train cosine
    class stiffness equals the float64 loop's (lr = 0: θ is the reference's)."""
    pl = pytest.importorskip("lightning.pytorch")
    from stiffmon_agent.integrations.lightning import StiffmonCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, C)).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, label, w = batch
            return _loss(self(x), {"label": label, "weight": w}).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    x, y = _probe()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y["label"], y["weight"]), batch_size=3
    )
    rec = tmp_path / "pl.stiff"
    cb = StiffmonCallback(
        loss_fn=_loss, probe=(x, y), class_target="label", endpoint="", record=str(rec),
        registry=False, gram_every=1, sharpness_every="never", overhead_cap=None,
    )  # fmt: skip
    module = Module()
    pl.Trainer(
        max_steps=1, callbacks=[cb], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
    ).fit(module, loader)  # fmt: skip
    msgs = read_session(rec)[0]
    (mat,) = [m for m in msgs if isinstance(m, p.Matrix) and m.name == "stiffness/cos/train-train"]
    rows = []
    for i in range(N):
        module.net.zero_grad()
        yi = {k: v[i : i + 1] for k, v in y.items()}
        _loss(module.net(x[i : i + 1]), yi).sum().backward()
        rows.append(torch.cat([q.grad.reshape(-1) for q in module.net.parameters()]).clone())
    g = torch.stack(rows)
    cos = (g @ g.T) / (g.norm(dim=1)[:, None] * g.norm(dim=1)[None, :])
    lab = y["label"]
    ref = torch.full((C, C), math.nan, dtype=torch.float64)
    for a in range(C):
        for b in range(C):
            vals = [float(cos[i, j]) for i in range(N) for j in range(N)
                    if i != j and lab[i] == a and lab[j] == b]  # fmt: skip
            ref[a, b] = sum(vals) / len(vals)
    ours = torch.as_tensor(mat.data, dtype=torch.float64)
    err = float((ours - ref).abs().max() / ref.abs().max())
    print(f"lightning class_target='label': max rel err vs float64 loop {err:.1e}")
    assert err < 1e-10
