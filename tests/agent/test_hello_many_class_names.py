"""21,843 class names of 60 characters (1.4 MB) do not fit a hello's 1 MiB header: they are left
out of it and counted, and the hello still goes (before, it was too big for every reader)."""

from __future__ import annotations

from torch import nn

from stiffmon import protocol as p
from stiffmon_agent.announce import HELLO_NAMES_MAX, hello_fields


def hello(names: list[str]) -> p.Hello:
    fields = hello_fields("run", nn.Linear(2, 2), {}, None, names, None, None, None)
    return p.Hello(run="r", seq=0, step=0, t=0.0, **fields)


def test_class_names_beyond_the_header_budget_are_left_out_and_counted() -> None:
    long = [f"n{i:08d} {'some long synonym list, ' * 2}"[:60] for i in range(21_843)]
    msg = hello(long)
    assert msg.class_names == () and msg.meta["class_names_left_out"] == 21_843
    frames = p.encode(msg)
    assert len(frames[1]) < p.MAX_HEADER_BYTES and p.decode(frames).meta == msg.meta
    short = [f"n{i:08d}" for i in range(21_843)]  # WordNet ids: 262 KB, kept
    assert sum(len(n) + 4 for n in short) < HELLO_NAMES_MAX
    assert hello(short).class_names == tuple(short)
