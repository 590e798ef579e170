"""Several nodes, one Redis: one channel space (SPEC §6, issue 3).

Nodes run in-process on free ports against a real ``redis-server``; backends
publish with a plain redis-py client, as any service would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from tests.conftest import NodeFactory, http_url, ws_url
from tests.helpers import Client, eventually, http_get, http_status, make_token
from tests.redis_server import RedisServer, numsub
from wsbroker.config import RateLimit
from wsbroker.server import Node

PREFIX = "ws:"


async def readyz_is(url: str, status: int) -> bool:
    return await http_status(url + "/readyz") == status


@pytest.fixture
async def backend(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A backend service's Redis client."""
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def fleet(
    redis_server: RedisServer, start_node: NodeFactory
) -> Callable[..., Awaitable[list[Node]]]:
    """Start nodes on one Redis (they stop before Redis does)."""

    async def start(count: int, **overrides: Any) -> list[Node]:
        return [await start_node(redis_url=redis_server.url, node_id=f"node-{index}",
                                 **overrides)
                for index in range(1, count + 1)]

    return start


async def test_backend_publish_reaches_subscribers_on_every_node(
    fleet: Callable[..., Awaitable[list[Node]]], backend: aioredis.Redis,
    redis_server: RedisServer,
) -> None:
    nodes = await fleet(3)
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(Client.connect(ws_url(node), make_token()))
                   for node in nodes for _ in range(2)]  # two subscribers per node
        for client in clients:
            await client.subscribe("prices.AAPL")
        assert {client.welcome["node"] for client in clients if client.welcome} == {
            "node-1", "node-2", "node-3"}
        # One Redis subscription per node, however many local subscribers.
        assert numsub(redis_server, PREFIX + "prices.AAPL") == {PREFIX + "prices.AAPL": 3}
        assert await backend.publish(PREFIX + "prices.AAPL", b'{"price": 189.5}') == 3
        for client in clients:
            message = await client.next_message()
            assert message == {"type": "message", "channel": "prices.AAPL",
                               "data": {"price": 189.5}}
        assert numsub(redis_server, PREFIX + "other") == {PREFIX + "other": 0}
    # The last local subscriber gone, each node drops its Redis subscription.
    await eventually(lambda: numsub(redis_server, PREFIX + "prices.AAPL")[
        PREFIX + "prices.AAPL"] == 0)


async def test_subscribe_then_publish_race_never_loses_a_message(
    fleet: Callable[..., Awaitable[list[Node]]], backend: aioredis.Redis,
) -> None:
    """The ok for subscribe means Redis confirmed it: a publish sent the moment the
    ok arrives is delivered, 200 times in a row, each on a fresh channel."""
    (node,) = await fleet(1, rate_limit=RateLimit(0, 0))
    async with Client.connect(ws_url(node), make_token()) as client:
        for attempt in range(200):
            channel = f"race.{attempt}"
            await client.subscribe(channel)
            await backend.publish(PREFIX + channel, orjson.dumps(attempt))
            message = await client.next_message(timeout=2)
            assert (message["channel"], message["data"]) == (channel, attempt)
            await client.request("unsubscribe", channel=channel)


async def test_order_and_completeness_across_nodes(
    fleet: Callable[..., Awaitable[list[Node]]], backend: aioredis.Redis,
) -> None:
    first, second = await fleet(2)
    count = 2000
    async with (
        Client.connect(ws_url(first), make_token("a"), max_size=None) as a,
        Client.connect(ws_url(first), make_token("b"), max_size=None) as b,
        Client.connect(ws_url(second), make_token("c"), max_size=None) as c,
    ):
        for client in (a, b, c):
            await client.subscribe("seq")
        async with backend.pipeline(transaction=False) as pipe:
            for index in range(count):
                pipe.publish(PREFIX + "seq", orjson.dumps({"n": index}))
            await pipe.execute()
        for client in (a, b, c):
            received = [(await client.next_message())["data"]["n"] for _ in range(count)]
            assert received == list(range(count))
            with pytest.raises(TimeoutError):  # and nothing more: no duplicates
                await client.next_message(timeout=0.1)


async def test_raw_envelope_and_invalid_payloads(
    fleet: Callable[..., Awaitable[list[Node]]], backend: aioredis.Redis,
) -> None:
    (node,) = await fleet(1)
    async with Client.connect(ws_url(node), make_token()) as client:
        await client.subscribe("feed")
        await backend.publish(PREFIX + "feed", b'  {"raw": [1, 2]}  ')
        await backend.publish(PREFIX + "feed", b'wsb1{"data": "wrapped", "from": "billing"}')
        await backend.publish(PREFIX + "feed", b"<html>not json</html>")
        await backend.publish(PREFIX + "feed", b'"next"')
        assert (await client.next_message())["data"] == {"raw": [1, 2]}
        assert await client.next_message() == {"type": "message", "channel": "feed",
                                                "data": "wrapped", "from": "billing"}
        assert (await client.next_message())["data"] == "next"
    _, _, metrics = await asyncio.to_thread(http_get, http_url(node) + "/metrics")
    assert 'wsbroker_messages_dropped_total{reason="invalid_payload"} 1.0' in metrics
    assert "wsbroker_messages_received_total 4.0" in metrics


async def test_client_publish_on_one_node_reaches_another_with_from(
    fleet: Callable[..., Awaitable[list[Node]]],
) -> None:
    first, second = await fleet(2)
    async with (
        Client.connect(ws_url(first), make_token("alice", publish=["chat.>"])) as alice,
        Client.connect(ws_url(second), make_token("bob")) as bob,
    ):
        await bob.subscribe("chat.lobby")
        reply = await alice.request("publish", channel="chat.lobby", data={"text": "hello"})
        assert reply["type"] == "ok"
        assert await bob.next_message() == {"type": "message", "channel": "chat.lobby",
                                            "data": {"text": "hello"}, "from": "alice"}


async def test_redis_outage_keeps_clients_and_recovers_subscriptions(
    fleet: Callable[..., Awaitable[list[Node]]], redis_server: RedisServer,
) -> None:
    (node,) = await fleet(1)
    url = http_url(node)

    async with Client.connect(ws_url(node), make_token(publish=[">"])) as client:
        await client.subscribe("live")
        assert await http_status(url + "/readyz") == 200

        redis_server.kill()
        await eventually(lambda: readyz_is(url, 503))
        reply = await client.request("subscribe", channel="during")
        assert reply["type"] == "error" and reply["code"] == "unavailable"
        async with Client.connect(ws_url(node), make_token("second")) as second:
            # Even a channel this node already holds: messages published while
            # Redis is gone would be missed, so no ok can be promised.
            reply = await second.request("subscribe", channel="live")
            assert reply["type"] == "error" and reply["code"] == "unavailable"
        reply = await client.request("publish", channel="live", data=1)
        assert reply["type"] == "error" and reply["code"] == "unavailable"
        assert (await client.request("unsubscribe", channel="during"))["type"] == "ok"
        assert (await client.request("ping"))["type"] == "ok"  # the WebSocket stayed open

        redis_server.start()
        await eventually(lambda: readyz_is(url, 200), timeout=10)  # backoff caps at 5 s
        async with aioredis.Redis.from_url(redis_server.url) as backend:
            await backend.publish(PREFIX + "live", b'"after the outage"')
        assert (await client.next_message())["data"] == "after the outage"
        reply = await client.request("publish", channel="live", data="mine")
        assert reply["type"] == "ok"
        assert (await client.next_message())["data"] == "mine"
    _, _, metrics = await asyncio.to_thread(http_get, url + "/metrics")
    assert "wsbroker_backplane_reconnects_total 1.0" in metrics
    assert "wsbroker_backplane_up 1.0" in metrics


async def test_a_node_starts_while_redis_is_down_and_becomes_ready(
    start_node: NodeFactory, redis_server: RedisServer,
) -> None:
    redis_server.kill()
    node = await start_node(redis_url=redis_server.url)
    assert await http_status(http_url(node) + "/readyz") == 503
    async with Client.connect(ws_url(node), make_token()) as client:  # still accepted
        assert (await client.request("subscribe", channel="x"))["code"] == "unavailable"
        redis_server.start()
        await eventually(lambda: readyz_is(http_url(node), 200), timeout=10)
        await client.subscribe("x")
