"""``nn.Embedding(sparse=True)``: sparse gradients are made dense where stiffmon reads them.

The Gram matrix (fast path, vmap, loop) and the Hessian-vector products of a model with a
sparse embedding must equal those of its dense twin (same weights, ``sparse=False``), computed
independently (the float64 reference loop, the dense Hessian); and an agent training it with
``SparseAdam`` measures both without a metric error.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from stiffmon import protocol as p
from stiffmon.session import read_session
from stiffmon_agent import Agent
from stiffmon_agent.metrics import HessianOperator, hessian_eigen, measurement_mode
from stiffmon_agent.metrics.gram import per_example_gradients, per_example_gram
from stiffmon_agent.metrics.gram.vmap import vmap_grads
from stiffmon_agent.metrics.probe import default_forward
from tests.agent.metrics.reference import dense_hessian_of, loop_gradients, loop_gram, rel_err

CE = nn.CrossEntropyLoss()
V, D, T = 12, 4, 6


class Bag(nn.Module):
    """Bag of tokens: embedding, mean over the non-padding tokens, tanh, linear head."""

    def __init__(self, sparse: bool, head: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D, sparse=sparse)
        self.fc = nn.Linear(D, 3)
        self.fc.requires_grad_(head)

    def forward(self, ids: Tensor) -> Tensor:
        mask = (ids != 0).to(self.emb.weight.dtype).unsqueeze(-1)
        e = (self.emb(ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        out: Tensor = self.fc(torch.tanh(e))
        return out


def _twins(head: bool = True) -> tuple[Bag, Bag, Tensor, Tensor]:
    """A float64 sparse-embedding model, its dense twin, token ids (repeats, padding) and labels."""
    torch.manual_seed(6)
    sparse = Bag(sparse=True, head=head).double()
    dense = Bag(sparse=False, head=head).double()
    dense.load_state_dict(sparse.state_dict())
    ids = torch.randint(1, V, (15, T))
    ids[torch.rand(15, T) < 0.3] = 0
    return sparse, dense, ids, torch.randint(0, 3, (15,))


@pytest.mark.parametrize("method", ["auto", "vmap", "loop"])
def test_gram_of_a_sparse_embedding_equals_its_dense_twin_s(method: str) -> None:
    sparse, dense, ids, y = _twins()
    ref = loop_gram(dense, ids, y, CE)
    got = per_example_gram(sparse, ids, y, CE, method=method)  # type: ignore[arg-type]
    assert rel_err(got.total, ref) < 1e-10
    assert not got.notes, got.notes  # vmap ran (no fallback to the loop), nothing to warn
    if method != "auto":
        assert set(got.methods.values()) == {method}
    assert sparse.emb.sparse  # restored after vmap


def test_per_example_gradients_of_a_sparse_embedding() -> None:
    sparse, dense, ids, y = _twins()
    ref = loop_gradients(dense, ids, y, CE)
    assert rel_err(per_example_gradients(sparse, ids, y, CE).detach(), ref) < 1e-12
    with measurement_mode(sparse):
        grads = vmap_grads(
            sparse, ["emb.weight"], ids, y, default_forward, nn.CrossEntropyLoss(reduction="none")
        )
    assert rel_err(grads["emb.weight"].detach().reshape(15, -1), ref[:, : V * D]) < 1e-12
    assert sparse.emb.sparse


@pytest.mark.parametrize("backend", ["auto", "graph", "double-backward"])
def test_sharpness_of_a_sparse_embedding_equals_its_dense_twin_s(backend: str) -> None:
    sparse, dense, ids, y = _twins()
    dense.eval()
    h = dense_hessian_of(dense, ids, lambda out: CE(out, y))
    ref = torch.linalg.eigvalsh(h)[-1]
    got = hessian_eigen(
        sparse,
        ids,
        y,
        CE,
        tol=1e-10,
        max_hvps=2000,
        backend=backend,  # type: ignore[arg-type]
        generator=torch.Generator().manual_seed(0),
    )
    assert got.converged and got.symmetry is not None and got.symmetry.symmetric
    assert abs(float(got.eigenvalues[0]) - float(ref)) / abs(float(ref)) < 1e-6
    with measurement_mode(sparse):
        op = HessianOperator(sparse, ids, y, CE, backend=backend)  # type: ignore[arg-type]
        v = torch.randn(op.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        assert rel_err(op(v), h @ v) < 1e-10
        g = op.gradient()
    d = copy.deepcopy(dense)
    loss = CE(d(ids), y)
    ref_g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(d.parameters()))])
    assert rel_err(g, ref_g) < 1e-12


def test_agent_with_sparse_adam_measures_gram_and_sharpness(tmp_path: Path) -> None:
    """SparseAdam trains the sparse embedding (the head is frozen: SparseAdam takes sparse
    gradients only); gram and sharpness are measured at every due step, no metric error."""
    model, _, ids, y = _twins(head=False)
    opt = torch.optim.SparseAdam(list(model.emb.parameters()), lr=0.01)
    rec = tmp_path / "sparse.stiff"
    with Agent(
        model,
        CE,
        opt,
        probe=(ids, y),
        endpoint="",
        record=rec,
        gram_every=2,
        sharpness_every=2,
        overhead_cap=None,
    ) as agent:
        for _ in range(5):
            out = model(ids)
            loss = CE(out, y)
            opt.zero_grad()
            loss.backward()
            assert model.emb.weight.grad is not None and model.emb.weight.grad.is_sparse
            opt.step()  # type: ignore[no-untyped-call]
            agent.step(loss, out, y)
    assert agent.disabled == {}
    msgs, _ = read_session(rec)
    errors = [m for m in msgs if isinstance(m, p.Event) and m.level == "error"]
    assert not errors, [(m.code, m.message) for m in errors]
    hessian = [m for m in msgs if isinstance(m, p.Spectrum) and m.name == "hessian"]
    assert [m.step for m in hessian] == [0, 2, 4]
    assert hessian[0].attrs["symmetric"] is True  # the cold start checked symmetry
    gram = [m for m in msgs if isinstance(m, p.Scalars) and "noise/trace_k" in m.names]
    assert [m.step for m in gram] == [0, 2, 4]
    assert all(m.as_dict()["noise/trace_k"] > 0 for m in gram)
