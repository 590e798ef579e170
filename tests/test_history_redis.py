"""History with a real ``redis-server``: the Function library, backends, and the node
recovering by itself after its subscription drops, a gap, or a Redis crash (SPEC §7).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

import wsbroker
from tests.conftest import NodeFactory, ws_url
from tests.helpers import Client, clean_env, eventually, make_token
from tests.redis_server import RedisServer, numsub
from wsbroker.history import LIBRARY_VERSION, HistoryRules, history_keys, load_library
from wsbroker.recovery import INSUFFICIENT_STATE
from wsbroker.server import Node

PREFIX = "h:"
RULES = HistoryRules.parse(["chat.>=100"])


class DurableRedis(RedisServer):
    """A redis-server that writes every command to its append-only file before replying."""

    def extra_args(self) -> list[str]:
        return ["--appendonly", "yes", "--appendfsync", "always"]


@pytest.fixture
def durable_redis() -> Iterator[DurableRedis]:
    server = DurableRedis()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def backend(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def start(start_node: NodeFactory, server: RedisServer, **overrides: Any) -> Node:
    """A node on ``server``, returned once it has loaded the Function library."""
    node = await start_node(**{"redis_url": server.url, "redis_prefix": PREFIX,
                               "history": RULES, **overrides})
    await library_loaded(server)
    return node


async def library_loaded(server: RedisServer) -> None:
    await eventually(lambda: bool(server.command("FUNCTION", "LIST", "LIBRARYNAME", "wsbroker")))


async def fcall_publish(server: RedisServer, channel: str, *values: int) -> list[int]:
    """Publish like a backend in any language: one FCALL per message."""
    client = aioredis.Redis.from_url(server.url)
    try:
        keys = history_keys((PREFIX + channel).encode())
        return [int((await client.fcall("wsb_publish", 2, *keys,  # type: ignore[misc]
                                        str(value), 100, 0))[0]) for value in values]
    finally:
        await client.aclose()


async def offsets(client: Client, count: int) -> list[int]:
    return [(await client.next_message(timeout=15))["offset"] for _ in range(count)]


async def test_nodes_load_the_function_library_at_connect(
        start_node: NodeFactory, redis_server: RedisServer) -> None:
    await start(start_node, redis_server)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await client.fcall("wsb_version", 0) == LIBRARY_VERSION  # type: ignore[misc]
        assert await load_library(client) is False  # the same version is never reloaded
    finally:
        await client.aclose()


async def test_a_lost_library_is_loaded_again_on_demand(
        start_node: NodeFactory, redis_server: RedisServer) -> None:
    node = await start(start_node, redis_server)
    async with Client.connect(ws_url(node), make_token("p", publish=[">"])) as client:
        assert (await client.request("publish", channel="chat.a", data=1))["offset"] == 1
        redis_server.command("FUNCTION", "FLUSH")
        assert (await client.request("publish", channel="chat.a", data=2))["offset"] == 2


async def test_keys_share_the_slot_of_the_channel(
        start_node: NodeFactory, redis_server: RedisServer) -> None:
    await start(start_node, redis_server)
    await fcall_publish(redis_server, "chat.k", 1)
    keys = sorted(redis_server.command("KEYS", "*"))
    assert keys == [b"{h:chat.k}:m", b"{h:chat.k}:s"]


async def test_ttl_expires_the_history_after_the_last_publish(
        start_node: NodeFactory, redis_server: RedisServer) -> None:
    node = await start(start_node, redis_server, history=HistoryRules.parse(["chat.>=10:1h"]))
    async with Client.connect(ws_url(node), make_token("p", publish=[">"])) as client:
        await client.request("publish", channel="chat.t", data=1)
        assert 3590 < redis_server.command("TTL", "{h:chat.t}:s") <= 3600
        assert 3590 < redis_server.command("TTL", "{h:chat.t}:m") <= 3600
        before = await client.request("history", channel="chat.t")
        redis_server.command("DEL", "{h:chat.t}:s", "{h:chat.t}:m")  # as if it expired
        after = await client.request("history", channel="chat.t")
        assert after["epoch"] != before["epoch"] and after["offset"] == 0


async def test_publish_command_records_and_prints_the_offset(
        start_node: NodeFactory, redis_server: RedisServer) -> None:
    node = await start(start_node, redis_server)
    async with Client.connect(ws_url(node), make_token()) as client:
        await client.subscribe("chat.cli")
        for expected in ("1", "2"):
            run = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "wsbroker", "publish", "chat.cli", '{"via":"cli"}',
                 "--redis-url", redis_server.url, "--redis-prefix", PREFIX,
                 "--history", "chat.>=100"],
                capture_output=True, text=True, timeout=30, env=clean_env())
            assert run.returncode == 0, run.stderr
            assert run.stdout == expected + "\n"
        plain = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "wsbroker", "publish", "other", "1",
             "--redis-url", redis_server.url, "--history", "chat.>=100"],
            capture_output=True, text=True, timeout=30, env=clean_env())
        assert (plain.returncode, plain.stdout) == (0, "")
        assert await offsets(client, 2) == [1, 2]


async def test_python_publish_records_history(
        start_node: NodeFactory, redis_server: RedisServer) -> None:
    node = await start(start_node, redis_server)
    async with Client.connect(ws_url(node), make_token()) as client:
        await client.subscribe("chat.py")
        published = await wsbroker.publish(redis_server.url, "chat.py", {"n": 1}, PREFIX,
                                           history=["chat.>=100"])
        assert published.offset == 1 and published.epoch
        plain = await wsbroker.publish(redis_server.url, "news", 1, PREFIX,
                                       history=["chat.>=100"])
        assert plain.offset is None
        assert await client.next_message() == {"type": "message", "channel": "chat.py",
                                               "data": {"n": 1}, "offset": 1}


async def test_node_recovers_what_it_missed_while_its_subscriber_reconnected(
        start_node: NodeFactory, redis_server: RedisServer) -> None:
    node = await start(start_node, redis_server)
    async with Client.connect(ws_url(node), make_token()) as client:
        await client.subscribe("chat.blip")
        await fcall_publish(redis_server, "chat.blip", 1)
        assert await offsets(client, 1) == [1]
        redis_server.command("CLIENT", "KILL", "TYPE", "pubsub")
        await fcall_publish(redis_server, "chat.blip", 2, 3, 4)
        assert numsub(redis_server, PREFIX + "chat.blip") == {PREFIX + "chat.blip": 0}
        assert await offsets(client, 3) == [2, 3, 4]  # read from the stream, in order
        await fcall_publish(redis_server, "chat.blip", 5)
        assert await offsets(client, 1) == [5]  # and live again, nothing twice
        text = node.metrics.render().decode()
        assert 'wsbroker_recoveries_total{result="node_recovered"}' in text


async def test_node_fills_an_offset_gap_from_the_stream(
        start_node: NodeFactory, redis_server: RedisServer) -> None:
    node = await start(start_node, redis_server)
    async with Client.connect(ws_url(node), make_token()) as client:
        ok = await client.subscribe("chat.gap")
        await fcall_publish(redis_server, "chat.gap", 1)
        # Offset 2 is recorded but its pub/sub message never reaches the node.
        epoch = ok["epoch"]
        redis_server.command("HINCRBY", "{h:chat.gap}:m", "o", 1)
        redis_server.command("XADD", "{h:chat.gap}:s", "2-0", "p",
                             f'wsb1{{"data":2,"offset":2,"epoch":"{epoch}"}}')
        await fcall_publish(redis_server, "chat.gap", 3)
        assert await offsets(client, 3) == [1, 2, 3]


async def test_node_recovers_after_redis_crashes_with_persistence(
        start_node: NodeFactory, durable_redis: DurableRedis) -> None:
    node = await start(start_node, durable_redis)
    async with Client.connect(ws_url(node), make_token()) as client:
        ok = await client.subscribe("chat.crash")
        await fcall_publish(durable_redis, "chat.crash", 1, 2)
        assert await offsets(client, 2) == [1, 2]
        durable_redis.kill()
        durable_redis.start()
        await fcall_publish(durable_redis, "chat.crash", 3, 4, 5)  # likely before the node is back
        assert await offsets(client, 3) == [3, 4, 5]
        await fcall_publish(durable_redis, "chat.crash", 6)
        assert await offsets(client, 1) == [6]
        page = await client.request("history", channel="chat.crash")
        assert page["epoch"] == ok["epoch"]
        assert [m["offset"] for m in page["messages"]] == [1, 2, 3, 4, 5, 6]


async def test_without_persistence_the_epoch_changes_and_subscribers_are_told(
        start_node: NodeFactory, redis_server: RedisServer) -> None:
    node = await start(start_node, redis_server)
    async with Client.connect(ws_url(node), make_token()) as client:
        ok = await client.subscribe("chat.gone")
        await fcall_publish(redis_server, "chat.gone", 1, 2)
        assert await offsets(client, 2) == [1, 2]
        redis_server.kill()
        redis_server.start()
        frame = await client.receive(timeout=15)
        assert frame == {"type": "unsubscribed", "channel": "chat.gone",
                         "reason": INSUFFICIENT_STATE}
        reply = await client.request("subscribe", channel="chat.gone",
                                     since={"offset": 2, "epoch": ok["epoch"]})
        assert reply["recovered"] is False and reply["epoch"] != ok["epoch"]
        assert reply["offset"] == 0
        await fcall_publish(redis_server, "chat.gone", 1)
        assert await offsets(client, 1) == [1]
    text = node.metrics.render().decode()
    assert 'wsbroker_recoveries_total{result="node_lost"} 1.0' in text




async def test_a_client_ahead_of_this_node_waits_for_it_and_recovers(
        start_node: NodeFactory, redis_server: RedisServer) -> None:
    node = await start(start_node, redis_server)
    async with Client.connect(ws_url(node), make_token()) as first:
        ok = await first.subscribe("chat.ahead")
        await fcall_publish(redis_server, "chat.ahead", 1)
        assert await offsets(first, 1) == [1]
        # Offset 2 is in Redis but has not reached this node (a client saw it elsewhere).
        redis_server.command("HINCRBY", "{h:chat.ahead}:m", "o", 1)
        redis_server.command("XADD", "{h:chat.ahead}:s", "2-0", "p",
                             f'wsb1{{"data":2,"offset":2,"epoch":"{ok["epoch"]}"}}')
        async with Client.connect(ws_url(node), make_token()) as ahead:
            await ahead.send({"op": "subscribe", "id": 1, "channel": "chat.ahead",
                              "since": {"offset": 2, "epoch": ok["epoch"]}})
            # Not needed for the outcome, only to make the subscribe wait for the node
            # here (the assertions hold whichever comes first).
            await asyncio.sleep(0.05)
            await fcall_publish(redis_server, "chat.ahead", 3)  # the node fills 2, then 3
            reply = await ahead.receive()
            assert reply["recovered"] is True and reply["offset"] == 3
            assert await offsets(ahead, 1) == [3]  # not 2, which it had: no duplicate
        assert await offsets(first, 2) == [2, 3]


async def test_history_and_publish_are_unavailable_while_redis_is_down(
        start_node: NodeFactory, redis_server: RedisServer) -> None:
    node = await start(start_node, redis_server)
    async with Client.connect(ws_url(node), make_token("p", publish=[">"])) as client:
        redis_server.kill()
        await eventually(lambda: not node.backplane.is_up)
        for op, fields in (("history", {}), ("publish", {"data": 1}), ("subscribe", {})):
            reply = await client.request(op, channel="chat.down", **fields)
            assert (reply["type"], reply["code"]) == ("error", "unavailable")
