"""Every measurement leaves the model exactly as it was: mode, buffers, grads, RNG state."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from stiffmon_agent.metrics import (
    capture_activations,
    hessian_eigen,
    hessian_trace,
    per_example_gram,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3),
    ).double()


def _snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "modes": [m.training for m in model.modules()],
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "grads": {
            k: (id(p.grad), None if p.grad is None else p.grad.clone())
            for k, p in model.named_parameters()
        },
        "rng": torch.get_rng_state(),
        "params": {k: p.detach().clone() for k, p in model.named_parameters()},
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def _same(a: dict[str, object], b: dict[str, object]) -> None:
    assert a["modes"] == b["modes"]
    assert a["requires_grad"] == b["requires_grad"]
    assert torch.equal(a["rng"], b["rng"])  # type: ignore[arg-type]
    for key in ("buffers", "params"):
        da, db = a[key], b[key]
        assert da.keys() == db.keys()  # type: ignore[attr-defined]
        for k in da:  # type: ignore[attr-defined]
            assert torch.equal(da[k], db[k]), (key, k)  # type: ignore[index]
    for k, (ida, ga) in a["grads"].items():  # type: ignore[attr-defined]
        idb, gb = b["grads"][k]  # type: ignore[index]
        assert ida == idb and ((ga is None and gb is None) or torch.equal(ga, gb))


MEASUREMENTS: dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor], object]] = {
    "gram": lambda m, x, y: per_example_gram(m, x, y, nn.CrossEntropyLoss()),
    "gram-vmap": lambda m, x, y: per_example_gram(m, x, y, nn.CrossEntropyLoss(), method="vmap"),
    "sharpness": lambda m, x, y: hessian_eigen(m, x, y, nn.CrossEntropyLoss(), k=2),
    "trace": lambda m, x, y: hessian_trace(m, x, y, nn.CrossEntropyLoss(), samples=3),
    "activations": lambda m, x, y: capture_activations(m, x, ["0", "5"]),
}


@pytest.mark.parametrize("name", sorted(MEASUREMENTS))
@pytest.mark.parametrize("train_mode", [True, False])
def test_model_state_is_restored(name: str, train_mode: bool) -> None:
    model = _model()
    x = torch.randn(6, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    model.train()
    nn.CrossEntropyLoss()(model(x), y).backward()  # real grads and updated running stats
    model.train(train_mode)
    model[5].bias.grad = None  # a mix of present and absent grads
    before = _snapshot(model)
    MEASUREMENTS[name](model, x, y)
    _same(before, _snapshot(model))


def test_state_is_restored_when_a_measurement_fails() -> None:
    model = _model().train()
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    before = _snapshot(model)
    with pytest.raises(ValueError):
        per_example_gram(model, x, torch.tensor([0, 1, 2, 0]), lambda o, t: o.sum())
    _same(before, _snapshot(model))


def test_optimizer_state_untouched() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    nn.CrossEntropyLoss()(model(x), y).backward()
    opt.step()
    state = {k: v["momentum_buffer"].clone() for k, v in enumerate(opt.state.values())}
    per_example_gram(model, x, y, nn.CrossEntropyLoss())
    hessian_eigen(model, x, y, nn.CrossEntropyLoss())
    for k, v in enumerate(opt.state.values()):
        assert torch.equal(v["momentum_buffer"], state[k])


def test_a_measurement_inside_an_autocast_block_runs_in_the_weights_dtype() -> None:
    """``agent.step()`` called inside the training's ``torch.autocast("cpu", bfloat16)`` block:
    the Gram and λ1_H are those of float32, not of bfloat16 (−14 % on a user's λ1_H)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 5))
    x, y = torch.randn(24, 16), torch.randint(0, 5, (24,))
    loss = nn.CrossEntropyLoss()
    plain = per_example_gram(model, x, y, loss).total
    lam = hessian_eigen(model, x, y, loss, tol=1e-6, max_hvps=100).eigenvalues[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16  # what the block does to a forward pass
        inside = per_example_gram(model, x, y, loss).total
        lam_inside = hessian_eigen(model, x, y, loss, tol=1e-6, max_hvps=100).eigenvalues[0]
        assert torch.is_autocast_enabled("cpu")  # left as it was
    assert torch.allclose(inside, plain, rtol=1e-6, atol=0)
    assert float(lam_inside) == pytest.approx(float(lam), rel=1e-4)
