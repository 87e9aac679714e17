"""RunData's view of the optimizer's param groups."""

from __future__ import annotations

from stiffmon.store import Store
from tests.stiffmon.tui.test_app import feed


def test_distinct_groups_put_groups_with_the_same_schedule_together() -> None:
    store = Store()
    feed(store, "r", range(10), now=0.0, **{"lr/0": 0.1, "lr/1": 0.01, "lr/2": 0.1, "lr/10": 0.01})
    rd = store.runs["r"]
    assert rd.param_groups("lr") == [0, 1, 2, 10]
    assert rd.distinct_groups("lr") == [[0, 2], [1, 10]]
    feed(store, "r", range(10, 12), now=0.0, **{"lr/0": 0.1, "lr/1": 0.01, "lr/2": 0.2})
    assert rd.distinct_groups("lr") == [[0], [1], [2], [10]]  # group 10 stopped: other steps
    assert rd.distinct_groups("momentum") == []
