"""Keepalive for every connection of a node: one sweep, no task or timer per connection.

A client the node has heard nothing from for :data:`PING_INTERVAL` gets a PING;
one still silent :data:`PING_TIMEOUT` after that PING is closed with 1011.
Silence counts from the last bytes received, whatever they were (a PONG, an
op, a PING of its own), so a busy connection is never pinged at all. Every
:data:`SWEEP` seconds the sweep takes a snapshot of the node's connections and
looks at them in :data:`SLICES` equal slices spread over the period, so no tick
holds the loop for long, even at 20,000 connections, and no connection pays
for a place in a keepalive structure of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection

from wsbroker.connection import ClientConnection
from wsbroker.tasks import cancel_and_wait

log = logging.getLogger("wsbroker.keepalive")

PING_INTERVAL = 20.0
"""Seconds of silence before a client is pinged."""
PING_TIMEOUT = 20.0
"""Seconds a pinged client has to send anything (its PONG) before it is dropped."""
SWEEP = 5.0
"""Seconds between two looks at the same connection: the precision of both times."""
SLICES = 20


class Keepalive:
    """Pings quiet clients and drops the ones that stay silent; start() to run."""

    def __init__(self, connections: Collection[ClientConnection]) -> None:
        self._connections = connections
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            snapshot = list(self._connections)
            size = -(-len(snapshot) // SLICES)  # ceil: every connection in some slice
            for index in range(SLICES):
                await asyncio.sleep(SWEEP / SLICES)
                self.check(snapshot[index * size:(index + 1) * size], loop.time())

    @staticmethod
    def check(connections: list[ClientConnection], now: float) -> None:
        """Ping the quiet, drop the silent, among ``connections``."""
        for connection in connections:
            try:
                if not connection.is_open:
                    continue
                if connection.pinged_at > connection.last_heard:
                    if now - connection.pinged_at >= PING_TIMEOUT:
                        connection.fail(1011, "keepalive ping timeout")
                elif now - connection.last_heard >= PING_INTERVAL:
                    connection.pinged_at = now
                    connection.ping()
            except Exception:  # one broken connection must not spare the others
                log.exception("keepalive failed for a client from %s", connection.address)
