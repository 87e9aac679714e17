"""Weights computed from the optimizer's parameters: ``parametrize`` (an own module,
``orthogonal``, ``weight_norm``, ``spectral_norm``), the old ``spectral_norm`` (power iteration
in a forward pre-hook, buffers u/v), ``prune`` (weight_orig · mask in a pre-hook), a LoRA-style
pre-hook W₀ + A B, and a parametrized weight used twice.

Every measurement is over the parameters the optimizer holds (``original``, ``weight_orig``,
A and B), against float64 references over exactly those: the dense Hessian of the flat vector
through a functional forward, and a per-example gradient loop. A measurement leaves buffers
(u, v, masks) and the modules' tensor attributes (the pre-hooks' ``weight``) as they were, and
the run trains as it does without the agent. Before this release the pre-hooks' ``weight`` was
left at the measurement's last recomputation instead of the loop's own.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize, prune

from tests.agent.metrics.reference import dense_hessian_of
from tests.agent.recording import EXACT, close_and_read, last_scalar, metric_errors, offline_agent

CE = nn.CrossEntropyLoss()


class Squash(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return 1.5 * torch.tanh(x)


class PlainWeightNorm(nn.Module):
    """g v / ‖v‖ in plain ops: the reference's (torch's fused one has a wrong 2nd derivative)."""

    def forward(self, g: Tensor, v: Tensor) -> Tensor:
        return g * v / v.norm(dim=1, keepdim=True)


def _mlp() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)
    ).double()


def _old_spectral_norm(m: nn.Sequential) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.nn.utils.spectral_norm(m[0])
        torch.nn.utils.spectral_norm(m[2])


def _prune(m: nn.Sequential) -> None:
    torch.manual_seed(5)
    prune.random_unstructured(m[0], "weight", amount=0.4)
    prune.l1_unstructured(m[2], "weight", amount=0.3)


def _lora(m: nn.Sequential) -> None:
    lin = m[2]
    w = lin.weight.detach().clone()
    del lin.weight
    lin.register_buffer("base_w", w)
    lin.a = nn.Parameter(0.5 * torch.randn(6, 2, dtype=torch.float64))
    lin.b = nn.Parameter(0.5 * torch.randn(2, 6, dtype=torch.float64))

    def hook(mod: nn.Module, _args: object) -> None:
        mod.weight = mod.base_w + 0.7 * mod.a @ mod.b

    lin.register_forward_pre_hook(hook)
    hook(lin, None)


class TwiceUsed(nn.Module):
    """One parametrized 6×6 weight used by its module and, transposed, by a functional layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        parametrize.register_parametrization(self.b, "weight", Squash())
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        return self.c(torch.tanh(nn.functional.linear(h, self.b.weight.T)))


KINDS: dict[str, Callable[[nn.Sequential], None]] = {
    "own": lambda m: parametrize.register_parametrization(m[0], "weight", Squash()),
    "orthogonal": lambda m: torch.nn.utils.parametrizations.orthogonal(m[2]),
    "weight_norm": lambda m: torch.nn.utils.parametrizations.weight_norm(m[0]),
    "spectral_norm": lambda m: torch.nn.utils.parametrizations.spectral_norm(m[2]),
    "old_spectral_norm": _old_spectral_norm,
    "prune": _prune,
    "lora": _lora,
}


def _model(kind: str) -> nn.Module:
    if kind == "twice":
        return TwiceUsed()
    m = _mlp()
    KINDS[kind](m)
    return m


def _state(model: nn.Module) -> dict[str, Tensor]:
    """Parameters, buffers (u, v, masks) and the modules' tensor attributes, by value."""
    out = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    for name, mod in model.named_modules():
        for k, v in vars(mod).items():
            if isinstance(v, Tensor):
                out[f"{name}.{k} (attribute)"] = v.detach().clone()
    return out


def _changed(a: dict[str, Tensor], b: dict[str, Tensor]) -> list[str]:
    return [
        k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k])
    ]


def _train(
    kind: str, rec: Path | None
) -> tuple[nn.Module, torch.optim.Adam, list[object], list[str]]:
    """Two Adam steps (β1 = 0: no momentum warm-up), measured at each where ``rec`` is given."""
    model = _model(kind)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 4, dtype=torch.float64, generator=gen), torch.arange(12) % 3
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.0, 0.99))
    agent = None
    if rec is not None:
        agent = offline_agent(model, CE, opt, rec, probe=(x, y), density_every="never", **EXACT)
    changed: list[str] = []
    for _ in range(2):
        xb = torch.randn(8, 4, dtype=torch.float64, generator=gen)
        yb = torch.randint(0, 3, (8,), generator=gen)
        out = model(xb)
        loss = CE(out, yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if agent is not None:
            before = _state(model)
            agent.step(loss, out, yb)
            changed += _changed(before, _state(model))
    msgs = close_and_read(agent, rec) if agent is not None and rec is not None else []
    return model, opt, msgs, changed


def _loop(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """N × P per-example gradients, one backward each (no deep copy: the pre-hooks' non-leaf
    ``weight`` attributes cannot be copied)."""
    params = [q for q in model.parameters() if q.requires_grad]
    rows = [
        torch.autograd.grad(CE(model(x[i : i + 1]), y[i : i + 1]), params) for i in range(len(y))
    ]
    return torch.stack([torch.cat([t.reshape(-1) for t in r]) for r in rows])


def _references(model: nn.Module, opt: torch.optim.Adam) -> dict[str, float]:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 4, dtype=torch.float64, generator=gen), torch.arange(12) % 3
    for m in model.modules():
        if isinstance(m, torch.nn.utils.parametrizations._WeightNorm):
            m.__class__ = PlainWeightNorm
    model.eval()
    params = [q for q in model.parameters() if q.requires_grad]
    h = dense_hessian_of(model, x, lambda out: CE(out, y))
    b2, eps = opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]
    p = torch.cat(
        [
            (
                (opt.state[q]["exp_avg_sq"] / (1 - b2 ** float(opt.state[q]["step"]))).sqrt() + eps
            ).reshape(-1)
            for q in params
        ]
    )  # Adam's P at β1 = 0
    d = p.rsqrt()
    g = _loop(model, x, y)
    cos = (g @ g.T) / (g.norm(dim=1)[:, None] * g.norm(dim=1)[None])
    same = (y[:, None] == y[None]) & ~torch.eye(12, dtype=torch.bool)
    within = torch.stack([cos[same & (y[:, None] == c)].mean() for c in range(3)]).mean()
    return {
        "sharpness/lambda1_h": torch.linalg.eigvalsh(h)[-1].item(),
        "sharpness/lambda1_precond": torch.linalg.eigvalsh(d[:, None] * h * d[None])[-1].item(),
        "noise/trace_k": ((g - g.mean(0)) ** 2).sum(1).mean().item(),
        "stiffness/cos/train-train/within": within.item(),
    }


@pytest.mark.parametrize("kind", [*KINDS, "twice"])
def test_measured_over_the_optimizer_s_parameters_and_left_as_it_was(
    kind: str, tmp_path: Path
) -> None:
    model, opt, msgs, changed = _train(kind, tmp_path / "r.stiff")
    assert metric_errors(msgs) == {}
    assert changed == []  # u/v buffers, masks, the pre-hooks' weight: bitwise as they were
    plain, _, _, _ = _train(kind, None)
    assert _changed(_state(plain), _state(model)) == []  # trains as without the agent
    for name, want in _references(model, opt).items():
        assert last_scalar(msgs, name) == pytest.approx(want, rel=1e-8), name
