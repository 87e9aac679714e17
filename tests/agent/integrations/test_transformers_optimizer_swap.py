"""The Hugging Face callback follows a replaced optimizer: a ``Trainer`` subclass or callback
that swaps ``trainer.optimizer`` mid-run hands the new one to ``on_step_end`` (its ``optimizer``
keyword), and the agent reads it from that step (``Agent.set_optimizer``)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from stiffmon import protocol as p
from stiffmon.session import read_session

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip(
    "transformers", reason="needs transformers: pip install 'stiffmon[transformers]'"
)

from stiffmon_agent.integrations.transformers import StiffmonCallback


def test_the_optimizer_of_each_step_end_is_followed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(16, 4), torch.arange(16) % 3
    record = tmp_path / "hf-swap.stiff"
    cb = StiffmonCallback(nn.CrossEntropyLoss(), endpoint="", record=str(record))
    args = SimpleNamespace(per_device_train_batch_size=16, gradient_accumulation_steps=1)
    state = SimpleNamespace(is_world_process_zero=True, global_step=0)
    opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cb.on_train_begin(args, state, None, model=model, optimizer=opt)
    for s in range(6):
        if s == 3:
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        state.global_step = s + 1
        cb.on_step_end(args, state, None, model=model, optimizer=opt)
    cb.on_train_end(args, state, None, model=model, optimizer=opt)
    msgs = read_session(record)[0]
    events = [m for m in msgs if isinstance(m, p.Event)]
    assert "optimizer-step-skipped" not in [e.code for e in events]
    (swap,) = [e for e in events if e.code == "optimizer-replaced"]
    assert swap.step == 3 and (swap.attrs["previous"], swap.attrs["optimizer"]) == ("AdamW", "SGD")
    cols = [m for m in msgs if isinstance(m, p.Columns)]
    assert np.concatenate([m.column("lr/0") for m in cols]).tolist() == [1e-3] * 3 + [0.05] * 3
