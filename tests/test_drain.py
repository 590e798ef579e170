"""Graceful shutdown of a real process on SIGTERM / SIGINT (SPEC §8)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable

import pytest
from websockets.exceptions import InvalidStatus

from tests.helpers import SECRET, Client, ServerProcess, eventually, http_status, make_token


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_drain_closes_clients_with_1012_spread_over_drain_seconds(
    server_process: Callable[..., ServerProcess], signum: int
) -> None:
    server = server_process("--jwt-secret", SECRET, "--drain-seconds", "2")
    clients = 6
    async with contextlib.AsyncExitStack() as stack:
        connected = [await stack.enter_async_context(Client.connect(server.url, make_token()))
                     for _ in range(clients)]
        async def ready_is(status: int) -> bool:
            return await http_status(server.http + "/readyz") == status

        assert await ready_is(200)
        started = time.monotonic()
        server.signal(signum)

        # /readyz turns 503 at once while HTTP keeps being served.
        await eventually(lambda: ready_is(503), timeout=1, every=0.01)
        with pytest.raises(InvalidStatus) as refused:
            async with Client.connect(server.url, make_token()):
                pass
        assert refused.value.response.status_code == 503

        async def closed_at(client: Client) -> tuple[int | None, float]:
            code, _ = await client.closed(timeout=10)
            return code, time.monotonic() - started

        results = await asyncio.gather(*(closed_at(client) for client in connected))
    codes = [code for code, _ in results]
    times = sorted(at for _, at in results)
    assert codes == [1012] * clients
    assert times[0] < 0.8, times  # the first goes at once...
    assert times[-1] > 1.2, times  # ...the last near the end of the 2 s spread
    assert times[-1] - times[0] > 1.0, times
    assert await asyncio.to_thread(server.wait, 10) == 0
