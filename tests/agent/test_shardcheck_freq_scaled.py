"""``nn.Embedding(scale_grad_by_freq=True)``: its backward divides each index's gradient by the
index's count in the batch, which is no loss's gradient.

The agent says so at construction (naming the layer, the option, and what it does to the
per-example gradients / Gram and to the Hessian), and :func:`~stiffmon_agent.freq_scaled.
unscaled` gives the derivatives of the loss itself: the Gram of the true per-example gradients
(a float64 loop over a copy without the option) with no false alarm from the Gram's batch checks,
and a symmetric Hessian whose top eigenvalue is the dense one's.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stiffmon_agent.freq_scaled import freq_scaled, freq_scaling_note, unscaled
from stiffmon_agent.metrics.gram import per_example_gram
from stiffmon_agent.metrics.sharpness import HessianOperator
from tests.agent.metrics.reference import dense_hessian_of, loop_gradients, rel_err
from tests.agent.recording import close_and_read, events, offline_agent, train_step


class _Tokens(nn.Module):
    def __init__(self, scale: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 4, scale_grad_by_freq=scale)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(torch.tanh(self.emb(x)).mean(1))
        return out


def _setup() -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """The model, a copy without the option (the same weights) and 10 sequences of 5 token ids
    from 6 (every one repeats an id)."""
    torch.manual_seed(0)
    model = _Tokens().double()
    plain = _Tokens(scale=False).double()
    plain.load_state_dict(model.state_dict())
    x, y = torch.randint(0, 6, (10, 5)), torch.randint(0, 3, (10,))
    return model, plain, x, y


def test_the_construction_names_the_layer_the_option_and_what_it_affects(tmp_path: Path) -> None:
    model, _, x, y = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = tmp_path / "r.stiff"
    agent = offline_agent(
        model, nn.CrossEntropyLoss(), opt, rec, probe=(x, y), gram_every="never",
        sharpness_every="never", density_every="never",
    )  # fmt: skip
    train_step(agent, opt, F.cross_entropy(model(x), y))
    (said,) = events(close_and_read(agent, rec), "grad-scale-by-freq")
    for part in ("emb", "scale_grad_by_freq=True", "Gram", "Hessian", "λ1_H"):
        assert part in said.message, part
    assert freq_scaling_note(_Tokens(scale=False)) is None
    frozen = _Tokens()
    frozen.emb.weight.requires_grad_(False)
    assert freq_scaled(frozen) == {}


def test_unscaled_gives_the_true_per_example_gram_without_a_false_alarm() -> None:
    model, plain, x, y = _setup()
    rows = loop_gradients(plain, x, y, F.cross_entropy)
    true = rows @ rows.T
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no false alarm from the Gram's checks either
        measured = per_example_gram(model, x, y, nn.CrossEntropyLoss()).total
    # measurement_mode switches the option off: with it on, the per-example backward divides
    # by in-example counts and the Gram was 3e-2 off, with misleading fallback warnings
    assert rel_err(measured, true) < 1e-12
    assert model.emb.scale_grad_by_freq  # restored
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with unscaled(model):
            gram = per_example_gram(model, x, y, nn.CrossEntropyLoss()).total
    print(f"unscaled: Gram vs the true one {rel_err(gram, true):.2e}")
    assert rel_err(gram, true) < 1e-12
    assert model.emb.scale_grad_by_freq  # restored


def test_unscaled_hessian_vector_products_are_the_symmetric_dense_hessians() -> None:
    model, plain, x, y = _setup()
    dense = dense_hessian_of(plain, x, lambda out: F.cross_entropy(out, y))
    want = float(torch.linalg.eigvalsh(dense)[-1])
    n = dense.shape[0]
    op = HessianOperator(model, x, y, nn.CrossEntropyLoss())
    scaled = torch.stack([op(e) for e in torch.eye(n, dtype=torch.float64)], dim=1)
    defect = rel_err(scaled, scaled.T)
    print(
        f"with the option: HVP matrix asymmetry {defect:.2e}, vs dense {rel_err(scaled, dense):.2e}"
    )
    assert defect > 1e-3  # what the construction note warns of
    with unscaled(model):
        op = HessianOperator(model, x, y, nn.CrossEntropyLoss())
        columns = torch.stack([op(e) for e in torch.eye(n, dtype=torch.float64)], dim=1)
    print(f"unscaled: HVP matrix vs dense Hessian {rel_err(columns, dense):.2e}")
    assert rel_err(columns, dense) < 1e-12
    got = float(torch.linalg.eigvalsh((columns + columns.T) / 2)[-1])
    print(f"λ1_H: ours {got:.10g} vs dense {want:.10g}")
    assert abs(got - want) <= 1e-10 * abs(want)
