"""Adam's warm-up, said again when it comes back.

λ1(P⁻¹H) waits ~1/(1−β1) steps of the fewest-stepped parameter; a part unfrozen mid-run (added
to the optimizer) restarts that count, and the NaN it brings must have its reason on screen
again, not only the one said at the start of the run.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from tests.agent.recording import (
    close_and_read,
    events,
    offline_agent,
    scalar_values,
    train_step,
)


def test_the_warmup_is_said_again_after_an_unfrozen_part_restarts_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 3, (32,))
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    net[0].requires_grad_(False)
    opt = torch.optim.Adam(net[2].parameters(), lr=1e-3)
    rec = tmp_path / "r.stiff"
    agent = offline_agent(
        net, nn.CrossEntropyLoss(), opt, rec, probe=(x[:12], y[:12]), gram_every="never",
        sharpness_every=1, density_every="never", overhead_cap=None,
    )  # fmt: skip
    for step in range(30):
        if step == 15:  # unfreeze the backbone: its parameters start at t = 0
            net[0].requires_grad_(True)
            opt.add_param_group({"params": list(net[0].parameters())})
        train_step(agent, opt, nn.functional.cross_entropy(net(x), y))
    msgs = close_and_read(agent, rec)
    said = events(msgs, "precond-warmup")
    assert len(said) == 2, [e.message for e in said]
    assert "published from then on" in said[0].message and "again" in said[1].message
    lam = scalar_values(msgs, "sharpness/lambda1_precond")
    assert math.isnan(lam[0]) and math.isfinite(lam[12]) and math.isnan(lam[16])
