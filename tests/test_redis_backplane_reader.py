"""The subscriber reader with a burst in one read: messages, a confirmation and an error.

The reader takes the replies a read of the socket brought from hiredis without
an await each (``link.buffered_replies``), and falls back to one
``read_response`` per reply when it cannot. Both paths must keep the wire
order: here Redis (``CLIENT PAUSE``, a real ``redis-server``, no mocked socket)
queues 300 messages, a SUBSCRIBE confirmation, an error reply and 300 more
messages and writes them to the subscriber connection at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from tests.redis_server import RedisServer, redis_cli
from wsbroker.backplane import link as link_module
from wsbroker.backplane.link import Expect
from wsbroker.backplane.redis import RedisBackplane
from wsbroker.config import Settings

pytestmark = pytest.mark.filterwarnings("error")

PREFIX = "t:"
BURST = 300


class Marked(asyncio.Future[Exception | None]):
    """A future that notes how many messages had been delivered when it was resolved."""

    def __init__(self, delivered: Callable[[], int]) -> None:
        super().__init__()
        self._delivered = delivered
        self.at = -1

    def set_result(self, result: Exception | None, /) -> None:
        self.at = self._delivered()
        super().set_result(result)


class Received:
    """The engine's message handler; ``until(n)`` returns once ``n`` messages came."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._target = 0
        self._reached = asyncio.Event()

    def on_message(self, channel: str, payload: bytes) -> None:
        self.messages.append((channel, payload))
        if len(self.messages) == self._target:
            self._reached.set()

    async def until(self, count: int, within: float = 10.0) -> None:
        self._target = count
        self._reached.clear()  # set by an earlier target
        if len(self.messages) < count:
            async with asyncio.timeout(within):
                await self._reached.wait()

    def payloads(self, channel: str) -> list[bytes]:
        return [payload for name, payload in self.messages if name == channel]


@contextlib.asynccontextmanager
async def started(redis_server: RedisServer) -> AsyncIterator[tuple[RedisBackplane, Received]]:
    engine = RedisBackplane(Settings(redis_url=redis_server.url, redis_prefix=PREFIX,
                                     node_id="reader"))
    engine.ping_interval = 60.0  # no PING in the middle of the test's reply count
    received = Received()
    engine.bind(received.on_message, lambda up: None)
    await engine.start()
    try:
        assert engine.is_up
        yield engine, received
    finally:
        await engine.stop()


async def publish(backend: aioredis.Redis, messages: list[tuple[str, bytes]]) -> None:
    """One pipeline of PUBLISHes: Redis reads it as one batch."""
    async with backend.pipeline(transaction=False) as pipe:
        for channel, payload in messages:
            pipe.publish(PREFIX + channel, payload)
        await pipe.execute()


@pytest.mark.parametrize("path", ["buffered", "read_response"])
async def test_a_burst_with_a_confirmation_and_an_error_in_one_read_keeps_wire_order(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    if path == "read_response":
        # The fallback: as with no hiredis, or a redis-py without the reader we use.
        monkeypatch.setattr(link_module, "buffered_replies", lambda conn: None)
    async with started(redis_server) as (backplane, received):
        await burst_in_one_read(redis_server, backplane, received, monkeypatch, path)


async def burst_in_one_read(redis_server: RedisServer, backplane: RedisBackplane,
                            received: Received, monkeypatch: pytest.MonkeyPatch,
                            path: str) -> None:
    await backplane.subscribe("a")
    sub = backplane._sub
    link = sub.link
    assert link is not None
    received_before = link.received
    # Count read_response calls (a spy around the real method; the socket is real).
    calls = 0
    read_response = link.conn.read_response

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return await read_response(*args, **kwargs)

    monkeypatch.setattr(link.conn, "read_response", counted)

    first = [("a", b"1:%d" % i) for i in range(BURST)]
    second = [("a" if i % 2 else "b", b"2:%d" % i) for i in range(BURST)]
    backend1 = aioredis.Redis.from_url(redis_server.url)
    backend2 = aioredis.Redis.from_url(redis_server.url)
    try:
        await backend1.ping()  # connected (the handshake is not held below)
        await backend2.ping()
        # Redis holds every client's commands, then runs them in the order the
        # clients were held and writes the subscriber's replies in one go.
        redis_cli(redis_server, "CLIENT", "PAUSE", "1000", "ALL")
        publishing = [asyncio.create_task(publish(backend1, first))]
        await asyncio.sleep(0.15)
        delivered = received.messages.__len__
        confirmed, refused = Marked(delivered), Marked(delivered)
        key = (PREFIX + "b").encode()
        async with link.lock:
            backplane._names[key] = "b"
            await sub.subscribe(link, key, confirmed)
            # Refused in subscribed mode: "ERR Can't execute 'publish' ..."
            await sub.write(link, [Expect(b"publish", None, refused)], b"PUBLISH", b"x", b"y")
        await asyncio.sleep(0.15)
        publishing.append(asyncio.create_task(publish(backend2, second)))
        await received.until(2 * BURST)
        await asyncio.gather(*publishing)
    finally:
        await backend1.aclose()
        await backend2.aclose()

    assert received.payloads("a") == [p for _, p in first] + [p for c, p in second if c == "a"]
    assert received.payloads("b") == [p for c, p in second if c == "b"]
    # The confirmation and the error were matched in wire order, mid-burst.
    assert confirmed.result() is None
    assert confirmed.at == BURST
    error = refused.result()
    assert isinstance(error, ResponseError) and "publish" in str(error).lower()
    assert refused.at == BURST
    # Every reply counted (the watchdog's view), the link alive and still delivering.
    assert link.received - received_before == 2 * BURST + 2
    assert not link.dead and sub.link is link and backplane.is_up
    if path == "buffered":
        assert calls < 20, f"{calls} read_response calls: buffered replies were not taken"
    else:
        assert calls >= 2 * BURST + 1
    await backplane.publish("b", b"after")
    await received.until(2 * BURST + 1)
    assert received.messages[-1] == ("b", b"after")
