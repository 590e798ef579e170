"""The in-process engine: one node, no Redis, the same behaviour.

It is a real engine, not a test double: the default for a newcomer's node and
a member of the shared engine test suite. Delivery is deferred with
``call_soon`` so that, as with Redis, ``publish`` returns before receivers run
and messages stay in publish order. History lives in the node
(:class:`~wsbroker.history.MemoryHistory`); the node never loses its
subscriptions, so it never asks the hub to resync.
"""

from __future__ import annotations

import asyncio

from wsbroker.backplane.base import Backplane, BackplaneUnavailable
from wsbroker.history import HistoryRule, MemoryHistory, Published, Stream


class MemoryBackplane(Backplane):
    """Loops published payloads back to this node's own subscriptions."""

    def __init__(self) -> None:
        super().__init__()
        self._channels: set[str] = set()
        self._running = False
        self.history = MemoryHistory()

    @property
    def is_up(self) -> bool:
        return self._running

    async def start(self) -> None:
        self._running = True
        self._on_state(True)

    async def stop(self) -> None:
        self._running = False
        self._channels.clear()
        self.history.clear()

    async def subscribe(self, channel: str) -> None:
        self._require_running()
        self._channels.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)

    async def publish(self, channel: str, payload: bytes) -> None:
        self._require_running()
        asyncio.get_running_loop().call_soon(self._deliver, channel, payload)

    async def publish_history(self, channel: str, data: bytes, sender: str | None,
                              rule: HistoryRule) -> Published:
        self._require_running()
        payload, published = self.history.publish(channel, data, sender, rule)
        asyncio.get_running_loop().call_soon(self._deliver, channel, payload)
        return published

    async def read_since(self, channel: str, after: int, count: int,
                         rule: HistoryRule) -> Stream:
        self._require_running()
        return self.history.since(channel, after, count, rule)

    async def read_newest(self, channel: str, count: int, rule: HistoryRule) -> Stream:
        self._require_running()
        return self.history.newest(channel, count, rule)

    def _deliver(self, channel: str, payload: bytes) -> None:
        if channel in self._channels:
            self._on_message(channel, payload)

    def _require_running(self) -> None:
        if not self._running:
            raise BackplaneUnavailable("the in-process backplane is stopped")
