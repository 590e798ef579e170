"""Publishing benchmark messages at a steady rate, the way a backend would.

A publisher takes a batch of (channel, payload) and returns once the backend
has them; :func:`publish_paced` calls it once per tick with whatever is due,
so the rate holds without a timer per message and a slow backend shows up as
``achieved_rate`` below the target instead of a growing queue.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from wsbroker.bench.messages import message


class Publisher(Protocol):
    """Hands batches of messages to the backplane."""

    async def publish(self, batch: Sequence[tuple[str, bytes]]) -> None: ...

    async def close(self) -> None: ...


class RedisPublisher:
    """``PUBLISH <prefix><channel>`` (or ``SPUBLISH`` on a cluster), pipelined per batch."""

    def __init__(self, url: str, prefix: str, *, cluster: bool = False) -> None:
        from redis.asyncio import Redis, RedisCluster

        self._prefix = prefix
        self._cluster = cluster
        self._client: Any = (RedisCluster.from_url(url) if cluster else Redis.from_url(url))

    async def publish(self, batch: Sequence[tuple[str, bytes]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        command = "SPUBLISH" if self._cluster else "PUBLISH"
        for channel, payload in batch:
            pipe.execute_command(command, self._prefix + channel, payload)
        await pipe.execute()

    async def close(self) -> None:
        await self._client.aclose()


class ApiPublisher:
    """``POST /api/publish`` per message through the HTTP API, on keep-alive connections."""

    CONNECTIONS = 32

    def __init__(self, api_url: str, api_key: str) -> None:
        import aiohttp

        self._url = api_url.rstrip("/") + "/api/publish"
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.CONNECTIONS),
            headers={"Authorization": f"Bearer {api_key}",
                     "Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=10),
        )

    async def publish(self, batch: Sequence[tuple[str, bytes]]) -> None:
        await asyncio.gather(*(self._post(channel, payload) for channel, payload in batch))

    async def _post(self, channel: str, payload: bytes) -> None:
        body = b'{"channel":"%s","data":%s}' % (channel.encode(), payload)
        async with self._session.post(self._url, data=body) as response:
            if response.status != 200:
                raise PublishFailed(f"POST /api/publish answered {response.status}: "
                                    f"{(await response.text())[:200]}")

    async def close(self) -> None:
        await self._session.close()


class PublishFailed(Exception):
    """The backend refused a publish; the run cannot count on its deliveries."""


@dataclass(slots=True)
class Published:
    """What a paced run sent: in all, per channel, and how fast."""

    sent: int = 0
    per_channel: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def achieved_rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


async def publish_paced(
    publisher: Publisher,
    channels: Sequence[str],
    rate: float,
    duration: float,
    *,
    step: int = 1,
    size: int = 100,
    on_tick: Callable[[Published], None] | None = None,
) -> Published:
    """Publish ``rate × duration`` messages round-robin over ``channels``, evenly in time.

    Message ``i`` goes to channel ``i mod K`` with sequence number ``i // K + 1``
    there, which is what the subscribers check for gaps and duplicates.
    """
    count = len(channels)
    total = round(rate * duration)
    result = Published(per_channel=[0] * count)
    started = time.perf_counter()
    while result.sent < total:
        due = min(total, int((time.perf_counter() - started) * rate) + 1)
        if due > result.sent:
            batch = [
                (channels[i % count], message(step, i // count + 1, size))
                for i in range(result.sent, due)
            ]
            await publisher.publish(batch)
            for i in range(result.sent, due):
                result.per_channel[i % count] += 1
            result.sent = due
            result.seconds = time.perf_counter() - started
            if on_tick is not None:
                on_tick(result)
        await asyncio.sleep(max(0.001, started + result.sent / rate - time.perf_counter()))
    result.seconds = time.perf_counter() - started
    return result
