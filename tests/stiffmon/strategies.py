"""Hypothesis strategies for stiffmon wire messages."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stiffmon import protocol as p

WIRE_DTYPES = sorted(p.ALLOWED_DTYPES)

text = st.text(max_size=20)  # includes non-ASCII and surrogate-free unicode
run_ids = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/"),
    min_size=1,
    max_size=24,
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    text,
)
attrs = st.dictionaries(text, json_scalars, max_size=4)


def arrays(ndim: int | None, *, max_side: int = 6) -> st.SearchStrategy[np.ndarray]:
    dims = st.just(ndim) if ndim is not None else st.integers(0, 3)
    return st.tuples(st.sampled_from(WIRE_DTYPES), dims).flatmap(
        lambda dn: hnp.arrays(
            dtype=np.dtype(dn[0]),
            shape=hnp.array_shapes(min_dims=dn[1], max_dims=dn[1], min_side=0, max_side=max_side),
        )
    )


def common() -> dict[str, st.SearchStrategy[Any]]:
    return {
        "run": run_ids,
        "seq": st.integers(0, 2**62),
        "step": st.integers(0, 2**62),
        "t": st.floats(0, 4e9, allow_nan=False),
    }


def _scalars() -> st.SearchStrategy[p.Scalars]:
    return st.integers(0, 8).flatmap(
        lambda n: st.builds(
            p.Scalars,
            names=st.lists(text, min_size=n, max_size=n).map(tuple),
            values=hnp.arrays(np.float64, n),  # NaN and ±Inf included
            **common(),
        )
    )


def _columns() -> st.SearchStrategy[p.Columns]:
    """Batches of 1-40 rows; steps often consecutive and columns often constant, NaN/±Inf/-0.0
    included, so the wire's shortened columns are exercised as much as the full ones."""

    def build(nk: tuple[int, int]) -> st.SearchStrategy[p.Columns]:
        n, k = nk
        first = st.integers(0, 2**40)
        consecutive = first.map(lambda s: np.arange(s, s + n, dtype=np.int64))
        gaps = st.tuples(first, hnp.arrays(np.int64, n, elements=st.integers(0, 3))).map(
            lambda fg: fg[0] + np.cumsum(fg[1])
        )
        column = st.one_of(
            hnp.arrays(np.float64, n),
            hnp.arrays(np.float64, 1).map(lambda a: np.repeat(a, n)),
        )

        def make(
            run: str,
            seq: int,
            steps: np.ndarray,
            times: np.ndarray,
            names: list[str],
            vals: list,
            cuts: list[int],
            seq_gaps: list[int],
            sparse: bool,
        ) -> p.Columns:
            # joined batches (a history chunk): ends at distinct rows, seqs increasing to seq
            ends = sorted({c for c in cuts if 0 < c < n} | {n}) if cuts else []
            gaps = (seq_gaps * len(ends))[: len(ends) - 1] if seq_gaps else [1] * (len(ends) - 1)
            seqs = (seq - np.cumsum([0, *gaps[::-1]]))[::-1] if ends else []
            if ends and int(seqs[0]) < 0:
                ends, seqs = [], []
            return p.Columns(
                run=run,
                seq=seq,
                step=int(steps[-1]),
                t=float(times[-1]),
                names=tuple(names),
                steps=steps,
                times=times,
                values=tuple(vals),
                batch_seqs=np.asarray(seqs, np.int64),
                batch_ends=np.asarray(ends, np.int64),
                sparse=sparse,
            )

        return st.builds(
            make,
            run=run_ids,
            seq=st.integers(0, 2**62),
            steps=st.one_of(consecutive, gaps),
            times=hnp.arrays(np.float64, n, elements=st.floats(0, 4e9)),
            names=st.lists(text, min_size=k, max_size=k),
            vals=st.lists(column, min_size=k, max_size=k),
            cuts=st.lists(st.integers(0, n), max_size=6),
            seq_gaps=st.lists(st.integers(1, 5), max_size=3),
            sparse=st.booleans(),
        )

    return st.tuples(st.integers(1, 40), st.integers(0, 5)).flatmap(build)


def _matrix() -> st.SearchStrategy[p.Matrix]:
    def build(data: np.ndarray) -> st.SearchStrategy[p.Matrix]:
        r, c = data.shape
        return st.builds(
            p.Matrix,
            name=text,
            data=st.just(data),
            row_labels=st.one_of(st.just(()), st.lists(text, min_size=r, max_size=r).map(tuple)),
            col_labels=st.one_of(st.just(()), st.lists(text, min_size=c, max_size=c).map(tuple)),
            attrs=attrs,
            **common(),
        )

    return arrays(2).flatmap(build)


def _curve() -> st.SearchStrategy[p.Curve]:
    return st.integers(0, 10).flatmap(
        lambda n: st.builds(
            p.Curve,
            name=text,
            x=hnp.arrays(np.float64, n),
            y=hnp.arrays(st.sampled_from([np.float32, np.float64]), n),
            attrs=attrs,
            **common(),
        )
    )


MESSAGES: dict[str, st.SearchStrategy[Any]] = {
    "hello": st.builds(
        p.Hello,
        name=text,
        host=text,
        pid=st.integers(0, 2**31),
        param_count=st.integers(0, 2**40),
        optimizer=attrs,
        batch_size=st.one_of(st.none(), st.integers(0, 2**20)),
        class_names=st.lists(text, max_size=12).map(tuple),
        probe_train=st.integers(0, 10_000),
        probe_val=st.integers(0, 10_000),
        agent_version=text,
        meta=attrs,
        **common(),
    ),
    "scalars": _scalars(),
    "columns": _columns(),
    "matrix": _matrix(),
    "curve": _curve(),
    "spectrum": st.builds(p.Spectrum, name=text, values=arrays(1), attrs=attrs, **common()),
    "event": st.builds(
        p.Event,
        level=st.sampled_from(sorted(p.Event.LEVELS)),
        code=text,
        message=text,
        attrs=attrs,
        **common(),
    ),
    "heartbeat": st.builds(
        p.Heartbeat, last_seq=st.integers(0, 2**62), dropped=st.integers(0, 2**62), **common()
    ),
    "bye": st.builds(p.Bye, reason=text, **common()),
}

any_message = st.one_of(*MESSAGES.values())
