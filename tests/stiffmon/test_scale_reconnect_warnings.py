"""An address where nothing answers is remade every few seconds: said the 1st, 2nd, 5th, 10th,
20th, … time in a row (still visible), not every time (which filled the screen with toasts)."""

from __future__ import annotations

from stiffmon.client import Client
from stiffmon.transport import free_port_pair


def test_said_at_one_two_five_times_powers_of_ten() -> None:
    from stiffmon.client import said_at

    assert [n for n in range(1, 1001) if said_at(n)] == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]


def test_a_dead_address_remade_100_times_warns_7_times_and_counts_all() -> None:
    address = f"tcp://127.0.0.1:{free_port_pair()}"
    with Client([address]) as client:
        (st,) = list(client._eps.values())
        for _ in range(100):
            client._new_dealer(st)
        warnings = client.take_warnings()
        assert client.stats.reconnects == 100
        assert len(warnings) == 7, warnings  # 1, 2, 5, 10, 20, 50, 100
        assert all("dropped the snapshot connection" in w for w in warnings)
        assert "(100 times" in warnings[-1] and "127.0.0.1" in warnings[-1]
        st.drops = 0  # it answered (the client resets the count on a snapshot frame)
        client._new_dealer(st)
        assert client.take_warnings() == [
            f"{st.endpoint.snapshot} dropped the snapshot connection; reconnecting"
        ]
