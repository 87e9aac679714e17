"""Weight-normed layers are measured with a right second derivative.

torch's fused ``_weight_norm`` (behind ``torch.nn.utils.weight_norm`` and
``torch.nn.utils.parametrizations.weight_norm``) has a wrong double backward; λ1_H measured
through it came out 4–8 % low on a weight-normed MLP (0.858 against the true 0.894). During a
measurement the agent computes w = g v / ‖v‖ in plain ops instead; the reference is the dense
Hessian of the same network written with plain ops, in float64.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from stiffmon import protocol as p
from stiffmon_agent.measure import SharpnessState, make_probe, sharpness_messages
from stiffmon_agent.metrics.plain_weight_norm import plain_weight_norm, weight_norm_plain
from tests.agent.metrics.reference import dense_hessian_of

CE = nn.CrossEntropyLoss()


class _Plain(nn.Module):
    """w = g v / ‖v‖ over every dimension but 0, in plain ops (a right double backward)."""

    def forward(self, g: Tensor, v: Tensor) -> Tensor:
        return g * v / v.flatten(1).norm(dim=1).reshape(g.shape)

    def right_inverse(self, w: Tensor) -> tuple[Tensor, Tensor]:
        return w.flatten(1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1))), w


def _mlp(kind: str) -> nn.Sequential:
    """Linear(4, 6) → tanh → Linear(6, 3), both weight-normed (``kind``), float64."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    for lin in (model[0], model[2]):
        if kind == "old":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                torch.nn.utils.weight_norm(lin)
        elif kind == "parametrizations":
            torch.nn.utils.parametrizations.weight_norm(lin)
        else:
            parametrize.register_parametrization(lin, "weight", _Plain(), unsafe=True)
    return model


def _lambda1(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, list[str]]:
    probe = make_probe((x, y), None, None, None, None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out, _ = sharpness_messages(
        model, CE, probe, 0, opt, state=SharpnessState(),
        generator=torch.Generator().manual_seed(0), tol=1e-8, max_hvps=200,
    )  # fmt: skip
    codes = [str(m.fields["code"]) for m in out if m.cls is p.Event]
    spec = next(m.fields for m in out if m.cls is p.Spectrum and m.fields["name"] == "hessian")
    return float(spec["values"][0]), codes  # type: ignore[index]


@pytest.mark.parametrize("kind", ["parametrizations", "old"])
def test_weight_normed_lambda1_h_equals_the_plain_ops_dense_hessian(kind: str) -> None:
    model = _mlp(kind)
    plain = _mlp("plain")
    plain.load_state_dict(
        {
            k.replace("weight_g", "parametrizations.weight.original0").replace(
                "weight_v", "parametrizations.weight.original1"
            ): v
            for k, v in model.state_dict().items()
        }
    )
    x = torch.randn(15, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.arange(15) % 3
    assert torch.allclose(model(x), plain(x), rtol=0, atol=1e-14)  # the same network
    plain.eval()
    ref = torch.linalg.eigvalsh(dense_hessian_of(plain, x, lambda out: CE(out, y)))[-1].item()
    got, codes = _lambda1(model, x, y)
    assert got == pytest.approx(ref, rel=1e-6)
    assert "hessian-asymmetric" not in codes


@pytest.mark.parametrize("dim", [0, 1, -1, 3])
def test_weight_norm_plain_equals_torch_s_values(dim: int) -> None:
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(5, 4, 3, 2, dtype=torch.float64, generator=gen)
    g = torch.rand(torch.norm_except_dim(v, 2, dim).shape, dtype=torch.float64, generator=gen)
    want = torch._weight_norm(v, g, dim)
    assert torch.allclose(weight_norm_plain(v, g, dim), want, rtol=1e-14, atol=0)


def test_the_plain_weight_norm_is_undone_afterwards() -> None:
    model, old = _mlp("parametrizations"), _mlp("old")
    module = sys.modules["torch.nn.utils.weight_norm"]
    fused = module._weight_norm
    wn = model[0].parametrizations.weight[0]
    with pytest.raises(RuntimeError), plain_weight_norm(model), plain_weight_norm(old):
        assert "forward" in wn.__dict__ and module._weight_norm is weight_norm_plain
        raise RuntimeError("a measurement that fails")
    assert "forward" not in wn.__dict__ and module._weight_norm is fused
