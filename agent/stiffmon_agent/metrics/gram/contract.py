r"""Gram contractions of per-layer factors: ghost, sparse-embedding and materialised forms."""

from __future__ import annotations

import torch
from torch import Tensor

GHOST_BLOCK_ELEMENTS = 1 << 24  # bound on r·N·T² for the blocked ghost contractions
PAIR_BLOCK_ELEMENTS = 1 << 20  # bound on pairs·d for the token pairs of the embedding Gram


def ghost_gram(a: Tensor, b: Tensor) -> Tensor:
    """Σ_g Σ_{t,s} (a_i[t]·a_j[s]) (b_i[t]·b_j[s]) for a (N, g, T, d_in), b (N, g, T, d_out)."""
    return ghost_cross(a, b, a, b)


def ghost_cross(a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor) -> Tensor:
    """Σ_g Σ_{t,s} (a1_i[t]·a2_j[s]) (b1_i[t]·b2_j[s]): the weight-gradient products of the
    examples of (a1, b1) with those of (a2, b2); a (n, g, T, d_in), b (n, g, T, d_out)."""
    n1, groups, t, _ = a1.shape
    n2 = a2.shape[0]
    if t == 1:
        p, q, u, v = (z[:, :, 0] for z in (a1, a2, b1, b2))
        if groups == 1:
            return (p[:, 0] @ q[:, 0].T) * (u[:, 0] @ v[:, 0].T)
        return torch.einsum("igd,jgd,ige,jge->ij", p, q, u, v)
    out = a1.new_zeros(n1, n2)
    rows = max(1, GHOST_BLOCK_ELEMENTS // max(1, n2 * t * t))
    for g in range(groups):
        for start in range(0, n1, rows):
            aa = torch.einsum("itd,jsd->ijts", a1[start : start + rows, g], a2[:, g])
            bb = torch.einsum("itd,jsd->ijts", b1[start : start + rows, g], b2[:, g])
            out[start : start + rows] += (aa * bb).sum(dim=(2, 3))
    return out


def embedding_gram(tokens: Tensor, b: Tensor) -> Tensor:
    """Gram of embedding gradients, ∇E_i = Σ_t e_{tok_i[t]} b_i[t]ᵀ, from their sparse rows.

    Each example's gradient has one row per distinct token v, r_i[v] = Σ_{t: tok_i[t] = v} b_i[t],
    and G[i, j] = Σ_v r_i[v] · r_j[v] runs over the pairs of rows that share a token: about
    d Σ_v c_v² multiply-adds for c_v examples holding token v, instead of N²T²d for the ghost
    form or N²Vd for dense gradients. Tokens held by at least N/4 of the examples (positions,
    frequent words) are cheaper as dense per-example rows and one matrix product, N²d per token.
    """
    n, t = tokens.shape
    d = b.shape[-1]
    ex = torch.arange(n, device=tokens.device).repeat_interleave(t)
    tok = tokens.reshape(-1).to(torch.int64)
    key = tok * n + ex  # sorted keys group rows by token, then by example
    uniq, inverse = torch.unique(key, return_inverse=True)
    rows = b.new_zeros(uniq.shape[0], d).index_add_(0, inverse, b.reshape(-1, d))
    row_tok, row_ex = uniq // n, uniq % n
    _, tok_of_row, counts = torch.unique_consecutive(
        row_tok, return_inverse=True, return_counts=True
    )
    out = b.new_zeros(n, n)
    dense = counts[tok_of_row] * DENSE_TOKEN_SHARE >= n
    if bool(dense.any()):
        _, col = torch.unique(tok_of_row[dense], return_inverse=True)
        m = b.new_zeros(n, int(col.max()) + 1, d)
        m[row_ex[dense], col] = rows[dense]
        m = m.reshape(n, -1)
        out += m @ m.T
        sparse = ~dense
        rows, row_tok, row_ex = rows[sparse], row_tok[sparse], row_ex[sparse]
        _, counts = torch.unique_consecutive(row_tok, return_counts=True)
    if rows.shape[0]:
        _pair_gram(rows, row_ex, counts, out)
    return out


DENSE_TOKEN_SHARE = 4  # tokens held by ≥ N/4 examples: dense rows


def _pair_gram(rows: Tensor, row_ex: Tensor, counts: Tensor, out: Tensor) -> None:
    """Add Σ_v r_i[v] · r_j[v] over the pairs of rows with the same token (rows sorted by token,
    ``counts`` rows per token) to ``out``."""
    device = rows.device
    d = rows.shape[1]
    starts = torch.cumsum(counts, 0) - counts
    group = torch.repeat_interleave(torch.arange(counts.shape[0], device=device), counts)
    per_row = counts[group]  # partners of each row: every row with the same token
    budget = max(1, PAIR_BLOCK_ELEMENTS // max(1, d))
    r, total_rows = 0, rows.shape[0]
    while r < total_rows:  # chunk over rows so the pair buffer stays bounded
        cum = torch.cumsum(per_row[r:], 0)
        stop = r + max(1, int(torch.searchsorted(cum, torch.tensor(budget, device=cum.device))))
        stop = min(stop, total_rows)
        left = torch.repeat_interleave(torch.arange(r, stop, device=device), per_row[r:stop])
        offs = torch.arange(left.shape[0], device=device) - torch.repeat_interleave(
            torch.cumsum(per_row[r:stop], 0) - per_row[r:stop], per_row[r:stop]
        )
        right = starts[group[left]] + offs
        dots = (rows[left] * rows[right]).sum(dim=1)
        out.index_put_((row_ex[left], row_ex[right]), dots, accumulate=True)
        r = stop


def materialise(a: Tensor, b: Tensor) -> Tensor:
    """Per-example weight gradients Σ_t b_i[t] a_i[t]ᵀ, flattened to (n, g·d_out·d_in)."""
    return torch.matmul(b.transpose(-1, -2), a).reshape(a.shape[0], -1)


def embedding_dense(tokens: Tensor, b: Tensor, num_embeddings: int) -> Tensor:
    """Per-example embedding gradients Σ_t e_{tok_i[t]} b_i[t]ᵀ as dense rows, (n, V·d)."""
    n, t = tokens.shape
    d = b.shape[-1]
    index = tokens.to(torch.int64).reshape(n, t, 1).expand(n, t, d)
    out = b.new_zeros(n, num_embeddings, d).scatter_add_(1, index, b.reshape(n, t, d))
    return out.reshape(n, -1)


SYRK_ROWS = 128  # row blocks of the symmetric product: 15–25 % faster than 64 on wide layers


def rows_gram(parts: list[Tensor]) -> Tensor:
    """M Mᵀ for M the row-concatenation of ``parts`` (per-example gradients, chunk by chunk).

    Only the blocks on and above the diagonal are multiplied (G is symmetric), in row blocks of
    ``SYRK_ROWS`` on the CPU: about (k + 1) / 2k of the multiply-adds of M Mᵀ for k blocks, and
    M itself is never concatenated. On a GPU the blocks are the parts themselves: there small
    products cost a kernel launch each (~6 µs) and leave the device idle.
    """
    blocks = [b for p in parts for b in (torch.split(p, SYRK_ROWS) if p.is_cpu else (p,))]
    if len(blocks) == 1:
        return torch.mm(blocks[0], blocks[0].T)
    n = sum(b.shape[0] for b in blocks)
    out = blocks[0].new_empty(n, n)
    starts = [0]
    for b in blocks:
        starts.append(starts[-1] + b.shape[0])
    for i, bi in enumerate(blocks):
        ri = slice(starts[i], starts[i + 1])
        for j in range(i, len(blocks)):
            rj = slice(starts[j], starts[j + 1])
            g = torch.mm(bi, blocks[j].T)
            out[ri, rj] = g
            if j > i:
                out[rj, ri] = g.T
    return out


def cat(parts: list[Tensor], dim: int = 0) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
