"""``nn.CTCLoss`` passed as ``loss_fn`` is refused with the callable to pass instead, and that
callable must measure the training objective: CTC's ``reduction="mean"`` divides each example's
loss by its target length before the batch mean, so the callable divides too. Before, the note
said only ``(reduction="none")``, whose ℓ_i measured Tr K 1.9× too large (a conv + GRU CTC
model, target lengths 1..4). Checked against the float64 per-example loop of the module itself
on each example alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stiffmon_agent.failure_hints import loss_signature_note
from stiffmon_agent.metrics import per_example_gram
from tests.agent.metrics.reference import rel_err

C, T, S = 5, 10, 3


class CtcNet(nn.Module):
    """(N, F, T) features to batch-first (N, T, C) log-probs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, padding=1)
        self.out = nn.Linear(6, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.conv(x)).transpose(1, 2)).log_softmax(-1)


def probe(n: int = 8) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 4, T, generator=g, dtype=torch.float64)
    targets = torch.randint(1, C - 1, (n, S), generator=g)
    input_lengths = torch.randint(7, T + 1, (n,), generator=g)
    target_lengths = torch.tensor([1, 2, 3, 1, 3, 2, 1, 3])[:n]
    return x, (targets, input_lengths, target_lengths)


def suggested_callable(module: nn.CTCLoss) -> object:
    """The ``loss_fn=lambda out, y: …`` of the note, evaluated."""
    note = loss_signature_note(module)
    assert note is not None
    code = note.split("loss_fn=", 1)[1].split(" for a model", 1)[0]
    return eval(code, {"F": F})


@pytest.mark.parametrize(
    "module",
    [nn.CTCLoss(), nn.CTCLoss(blank=C - 1, zero_infinity=True), nn.CTCLoss(reduction="sum")],
    ids=["mean", "blank-last", "sum"],
)
def test_the_ctc_note_gives_a_callable_that_measures_the_training_objective(
    module: nn.CTCLoss,
) -> None:
    torch.manual_seed(0)
    model = CtcNet().double()
    x, y = probe()
    if module.blank == C - 1:
        y = (y[0] - 1, y[1], y[2])  # labels 0..C-2, the blank last
    fn = suggested_callable(module)
    got = per_example_gram(model, x, y, fn).total

    params = list(model.parameters())
    rows = []
    for i in range(x.shape[0]):  # the training loss on each example alone
        loss = module(model(x[i : i + 1]).transpose(0, 1), *(t[i : i + 1] for t in y))
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    want = torch.stack(rows) @ torch.stack(rows).T
    assert rel_err(got, want) < 1e-10
    if module.reduction == "sum":
        assert 'reduction = "sum"' in str(loss_signature_note(module))
