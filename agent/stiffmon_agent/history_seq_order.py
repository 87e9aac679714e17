"""The history in ``seq`` order, for monitors that ask for their snapshot that way.

Monitors of before the sparse chunks (their snapshot request has no ``"order"``) keep a run's
highest ``seq`` as they go through a snapshot and drop anything at or below it, so they need it in
strictly increasing ``seq``: here the values of ``scalars`` messages are regrouped into one
``scalars`` message per ``seq`` (as they were published), and every per-step chunk is cut where
another message's ``seq`` falls between its batches. That costs what the old history cost (a
message per cut), and only those monitors pay it.
"""

from __future__ import annotations

import heapq
from collections import defaultdict

import numpy as np

from stiffmon import protocol as p
from stiffmon_agent.history import History, Item


def seq_ordered(history: History) -> list[Item]:
    """Every kept message, in increasing ``seq`` (``(seq, frames)``)."""
    run = history.columns.run
    rows: dict[int, list[tuple[str, int, float, float]]] = defaultdict(list)
    for name, stretches in history.scalars.stretches():
        for s in stretches:
            for step, t, v, q in zip(
                s.steps[: s.n].tolist(),
                s.times[: s.n].tolist(),
                s.values[: s.n].tolist(),
                s.seqs[: s.n].tolist(),
                strict=True,
            ):
                rows[q].append((name, step, t, v))
    scalars: list[Item] = []
    for q in sorted(rows):
        got = rows[q]
        msg = p.Scalars(
            run=run,
            seq=q,
            step=got[0][1],
            t=got[0][2],
            names=tuple(r[0] for r in got),
            values=np.array([r[3] for r in got], np.float64),
        )
        scalars.append((q, p.encode(msg)))
    others = list(heapq.merge(history.heavy, scalars, key=lambda item: item[0]))
    cuts = np.array([q for q, _ in others], np.int64)
    chunks: list[Item] = []
    for _, frames in history.columns.in_order():
        chunk = p.decode(frames)
        assert isinstance(chunk, p.Columns)
        chunks += _split(chunk, cuts)
    return list(heapq.merge(others, chunks, key=lambda item: item[0]))


def _split(chunk: p.Columns, cuts: np.ndarray) -> list[Item]:
    """``chunk`` cut between any two of its batches that another message's ``seq`` falls
    between; each piece keyed by its ``seq`` (its last batch's)."""
    seqs, ends = chunk.batches()
    inside = np.searchsorted(cuts, seqs, side="left")  # cuts below each batch's seq
    breaks = np.flatnonzero(np.diff(inside)) + 1  # a batch that has cuts just below it
    if not breaks.size:
        return [(chunk.seq, p.encode(chunk))]
    out: list[Item] = []
    lo = 0
    starts = np.concatenate([[0], ends[:-1]])
    for hi in [*breaks.tolist(), seqs.shape[0]]:
        a, b = int(starts[lo]), int(ends[hi - 1])
        piece = p.Columns.from_columns(
            {n: v[a:b] for n, v in zip(chunk.names, chunk.values, strict=True)},
            chunk.steps[a:b],
            chunk.times[a:b],
            run=chunk.run,
            seq=int(seqs[hi - 1]),
            batch_seqs=seqs[lo:hi],
            batch_ends=ends[lo:hi] - a,
        )
        out.append((piece.seq, p.encode(piece)))
        lo = hi
    return out
