r"""The plan: which modules take the hook path, and per layer ghost or materialised gradients.

Per layer the cheaper of (Bu et al. 2022, mixed ghost clipping)

* the *ghost* form ⟨∇W_i, ∇W_j⟩ = Σ_{t,s} (a_i[t]·a_j[s]) (b_i[t]·b_j[s]), which for T = 1 is
  (A Aᵀ) ∘ (B Bᵀ), costing ~N²T²(d_in + d_out), and
* *materialised* per-layer gradients ∇W_i (N × d_out d_in) and their Gram, costing
  ~N T d_in d_out + N² d_in d_out.

A weight tied between ``nn.Linear`` and ``nn.Embedding`` modules (a language model's input
embedding and output head) takes the hook path in every one of them (:attr:`Layer.tied`): each
use's per-example gradient is materialised in the weight's (d_out, d_in) layout, and the uses are
summed before the Gram (:mod:`.chunks`), which then holds their cross terms. Modules sharing
parameters otherwise, that live inside a
module with ``batch_first=False`` (unless their rule reads the layout of each call itself, as
:mod:`.attention` does), or that have no registered rule take the fallbacks. A capturing rule
(:class:`~.rules.CaptureRule`) claims the parameters of its sub-modules (``out_proj``), which
then take no rule of their own.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor, nn

from stiffmon_agent.metrics.gram.rules import CaptureRule, LayerRule, rule_for

Method = Literal["auto", "ghost", "materialise", "vmap", "loop"]


@dataclass
class Block:
    """Accumulated per-example factors of one parameter of a hooked layer, over chunks.

    ``kind`` is ``"linear"`` (a: (n, g, T, d_in), b: (n, g, T, d_out)), ``"embedding"``
    (a: tokens (n, T), b: (n, T, d)) or ``"dense"`` (grads: (n, P) per-example gradients).
    """

    kind: str
    method: str = ""
    a: list[Tensor] = field(default_factory=list)
    b: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)


@dataclass
class Layer:
    name: str
    module: nn.Module
    rule: LayerRule | CaptureRule
    params: dict[str, nn.Parameter]  # trainable parameters by name relative to the module
    blocks: dict[str, Block] = field(default_factory=dict)
    shared: bool = False  # its calls were shared by the examples of an earlier chunk (expanded)
    tied: frozenset[str] = frozenset()  # its parameters another hooked module uses too

    def fresh(self) -> Layer:
        return Layer(self.name, self.module, self.rule, self.params, tied=self.tied)


def plan(model: nn.Module, method: Method) -> dict[str, Layer]:
    """Choose the modules whose parameters take the hook path."""
    if method in ("vmap", "loop"):
        return {}
    owners: dict[nn.Parameter, int] = defaultdict(int)
    for _, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            owners[p] += 1
    not_batch_first: set[str] = set()
    for mname, mod in model.named_modules():
        if getattr(mod, "batch_first", True) is False:
            prefix = f"{mname}." if mname else ""
            not_batch_first.update(n for n, _ in model.named_modules() if n.startswith(prefix))
    layers: dict[str, Layer] = {}
    claimed: set[int] = set()  # parameters of a capturing layer's sub-modules
    for mname, mod in model.named_modules():
        rule = rule_for(mod)
        if rule is None:
            continue
        capture = is_capture(rule)
        if mname in not_batch_first and not capture:
            continue
        if capture:
            direct = rule.parameters(mod)  # type: ignore[union-attr]
            names = set(direct)
        else:
            direct = dict(mod.named_parameters(recurse=False))
            names = {"weight", "bias"}
        if any(id(p) in claimed for p in direct.values()):
            continue
        if capture:
            claimed.update(id(p) for p in direct.values())
        tied = frozenset(k for k, p in direct.items() if owners[p] > 1)
        if tied and not _tieable(mod):
            continue  # shared with another module: the fallbacks sum all of its uses exactly
        trainable = {k: p for k, p in direct.items() if p.requires_grad and k in names}
        if trainable and len(trainable) == sum(p.requires_grad for p in direct.values()):
            layers[mname] = Layer(mname, mod, rule, trainable, tied=tied)
    return untie_incomplete(model, layers)


def _tieable(mod: nn.Module) -> bool:
    """Modules whose per-example weight gradients add up in one layout when tied."""
    return type(mod) in (nn.Linear, nn.Embedding)


def untie_incomplete(model: nn.Module, layers: dict[str, Layer]) -> dict[str, Layer]:
    """``layers`` without those whose tied parameters some module outside ``layers`` also owns
    (its use would be missing from the sum of the uses): those parameters take the fallbacks."""
    owners: dict[int, set[str]] = defaultdict(set)
    for mname, mod in model.named_modules():
        for q in mod.parameters(recurse=False):
            owners[id(q)].add(mname)
    while True:
        drop = {
            name
            for name, layer in layers.items()
            for k in layer.tied
            if not owners[id(layer.module.get_parameter(k))] <= set(layers)
        }
        if not drop:
            return layers
        layers = {k: v for k, v in layers.items() if k not in drop}


def is_capture(rule: LayerRule | CaptureRule) -> bool:
    """Whether the rule records its own calls (:class:`~.rules.CaptureRule`)."""
    return hasattr(rule, "install")


def ghost_cost(n: int, t: int, d_in: int, d_out: int) -> tuple[float, float]:
    ghost = float(n) * n * t * t * (d_in + d_out + 1)
    materialise = float(n) * t * d_in * d_out + float(n) * n * d_in * d_out
    return ghost, materialise


def choose(kind: str, a: Tensor, b: Tensor, n: int, method: Method) -> str:
    """``"ghost"`` or ``"materialise"`` for a block, by ``method`` or by the cost model."""
    if kind == "embedding":
        return "ghost"
    if method in ("ghost", "materialise"):
        return method
    ghost, mat = ghost_cost(n, a.shape[2], a.shape[3], b.shape[3])
    return "ghost" if ghost <= mat else "materialise"


def gram_flops_estimate(n: int, t: int, d_in: int, d_out: int) -> dict[str, float]:
    """FLOP estimates of the two per-layer forms (used to choose; exposed for benchmarks)."""
    ghost, mat = ghost_cost(n, t, d_in, d_out)
    return {"ghost": ghost, "materialise": mat, "log10_ratio": math.log10(ghost / mat)}
