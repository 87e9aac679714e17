"""A dropped and remade connection reaches the screen: a warning toast and the status line."""

from __future__ import annotations

import re

from stiffmon.transport import free_port_pair
from stiffmon.tui.app import StiffmonApp
from stiffmon.tui.sources import LiveSource
from tests.stiffmon.test_client_reconnect import OversizedPub
from tests.stiffmon.tui.test_app import notified, screen_text


async def test_a_peer_sending_an_oversized_frame_is_shown_reconnecting() -> None:
    port = free_port_pair()
    hostile = OversizedPub(port)
    address = f"tcp://127.0.0.1:{port}"
    try:
        app = StiffmonApp(live=LiveSource([address]))
        async with app.run_test(size=(120, 30)) as pilot:
            assert await notified(app, pilot, f"{address} sent an oversized", timeout=8.0)
            for _ in range(40):
                await pilot.pause(0.1)
                if re.search(r"reconnects [1-9]", screen_text(app)):
                    break
            assert re.search(r"reconnects [1-9]", screen_text(app)), screen_text(app)
    finally:
        hostile.close()
