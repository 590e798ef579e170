"""History and recovery over the WebSocket protocol (SPEC §7), on every engine.

Each test runs against the in-process engine and a real ``redis-server``
(and the Redis Cluster where it says so): offsets and epochs, the ``history``
op, ``subscribe`` with ``since``, and recovery while publishing goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.conftest import NodeFactory, ws_url
from tests.helpers import Client, clean_env, make_token
from tests.redis_server import RedisServer
from wsbroker.config import RateLimit
from wsbroker.history import HistoryRules
from wsbroker.server import Node

RULES = HistoryRules.parse(["chat.>=100", "tiny.>=3", "ttl.>=10:1h"])
PUBLISHER = make_token("pub", publish=[">"])


@pytest.fixture(params=["memory", "redis"])
async def engine(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Settings overrides for a node on each engine, with the history rules above."""
    if request.param == "memory":
        return {"history": RULES}
    server: RedisServer = request.getfixturevalue("redis_server_module")
    server.command("FLUSHALL")
    return {"history": RULES, "redis_url": server.url, "redis_prefix": "h:"}


@pytest.fixture
async def hnode(start_node: NodeFactory, engine: dict[str, Any]) -> Node:
    return await start_node(**engine)


@contextlib.asynccontextmanager
async def clients(node: Node, *tokens: str) -> AsyncIterator[list[Client]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(Client.connect(ws_url(node), token))
               for token in tokens]


async def publish(client: Client, channel: str, data: Any) -> dict[str, Any]:
    reply = await client.request("publish", channel=channel, data=data)
    assert reply["type"] == "ok", reply
    return reply


async def messages(client: Client, count: int) -> list[dict[str, Any]]:
    return [await client.next_message() for _ in range(count)]


async def test_publish_gets_offsets_one_two_three(hnode: Node) -> None:
    async with clients(hnode, PUBLISHER, make_token("sub")) as (pub, sub):
        ok = await sub.subscribe("chat.room")
        assert ok["offset"] == 0 and isinstance(ok["epoch"], str) and ok["epoch"]
        for index in range(1, 4):
            reply = await publish(pub, "chat.room", {"n": index})
            assert reply == {"type": "ok", "id": index, "channel": "chat.room", "offset": index}
        assert await messages(sub, 3) == [
            {"type": "message", "channel": "chat.room", "data": {"n": n}, "from": "pub",
             "offset": n} for n in (1, 2, 3)]
        again = await sub.request("subscribe", channel="chat.room")  # idempotent
        assert (again["offset"], again["epoch"]) == (3, ok["epoch"])
        for since, recovered in ((3, True), (1, False)):  # live already: nothing replayed
            reply = await sub.request("subscribe", channel="chat.room",
                                      since={"offset": since, "epoch": ok["epoch"]})
            assert (reply["offset"], reply["recovered"]) == (3, recovered)


async def test_plain_channels_have_no_offsets(hnode: Node) -> None:
    async with clients(hnode, PUBLISHER) as (pub,):
        ok = await pub.subscribe("news")
        assert ok == {"type": "ok", "id": 1, "channel": "news"}
        assert await publish(pub, "news", 1) == {"type": "ok", "id": 2, "channel": "news"}
        assert await pub.next_message() == {"type": "message", "channel": "news", "data": 1,
                                            "from": "pub"}


async def test_history_op_returns_the_newest_oldest_first(hnode: Node) -> None:
    async with clients(hnode, PUBLISHER) as (pub,):
        empty = await pub.request("history", channel="chat.a")
        assert (empty["messages"], empty["offset"]) == ([], 0)
        for index in range(1, 6):
            await publish(pub, "chat.a", index)
        page = await pub.request("history", channel="chat.a", limit=3)
        assert page["type"] == "ok" and page["channel"] == "chat.a"
        assert page["messages"] == [
            {"type": "message", "channel": "chat.a", "data": n, "from": "pub", "offset": n}
            for n in (3, 4, 5)]
        assert (page["offset"], page["epoch"]) == (5, empty["epoch"])
        full = await pub.request("history", channel="chat.a")
        assert [m["offset"] for m in full["messages"]] == [1, 2, 3, 4, 5]


async def test_history_keeps_only_size_messages(hnode: Node) -> None:
    async with clients(hnode, PUBLISHER) as (pub,):
        for index in range(1, 8):
            await publish(pub, "tiny.x", index)
        page = await pub.request("history", channel="tiny.x", limit=100)
        assert [m["data"] for m in page["messages"]] == [5, 6, 7]
        assert page["offset"] == 7


async def test_history_on_a_channel_without_history_is_not_enabled(hnode: Node) -> None:
    async with clients(hnode, PUBLISHER) as (pub,):
        reply = await pub.request("history", channel="news")
        assert reply["type"] == "error" and reply["code"] == "not_enabled"


async def test_since_replays_what_was_missed_then_live(hnode: Node) -> None:
    async with clients(hnode, PUBLISHER) as (pub,):
        ok = await pub.subscribe("chat.r")
        for index in range(1, 4):
            await publish(pub, "chat.r", index)
        await messages(pub, 3)
        async with clients(hnode, make_token("late")) as (late,):
            await late.send({"op": "subscribe", "id": 1, "channel": "chat.r",
                             "since": {"offset": 1, "epoch": ok["epoch"]}})
            reply = await late.receive()  # the ok comes before the replay
            assert reply == {"type": "ok", "id": 1, "channel": "chat.r", "offset": 3,
                             "epoch": ok["epoch"], "recovered": True}
            await publish(pub, "chat.r", 4)
            assert [m["offset"] for m in await messages(late, 3)] == [2, 3, 4]


async def test_since_at_the_latest_offset_recovers_nothing_to_replay(hnode: Node) -> None:
    async with clients(hnode, PUBLISHER) as (pub,):
        ok = await pub.subscribe("chat.n")
        await publish(pub, "chat.n", 1)
        async with clients(hnode, make_token("late")) as (late,):
            reply = await late.request("subscribe", channel="chat.n",
                                       since={"offset": 1, "epoch": ok["epoch"]})
            assert (reply["recovered"], reply["offset"]) == (True, 1)
            await publish(pub, "chat.n", 2)
            assert (await late.next_message())["offset"] == 2


@pytest.mark.parametrize("since", [
    {"offset": 1, "epoch": "not-the-epoch"},
    {"offset": 9, "epoch": None},  # beyond the latest
    {"offset": 1, "epoch": None},  # trimmed: tiny keeps 3
])
async def test_since_that_cannot_be_honoured_is_not_recovered(
        hnode: Node, since: dict[str, Any]) -> None:
    async with clients(hnode, PUBLISHER) as (pub,):
        ok = await pub.subscribe("tiny.r")
        for index in range(1, 6):
            await publish(pub, "tiny.r", index)
        await messages(pub, 5)
        async with clients(hnode, make_token("late")) as (late,):
            since = {**since, "epoch": since["epoch"] or ok["epoch"]}
            reply = await late.request("subscribe", channel="tiny.r", since=since)
            assert reply["recovered"] is False
            assert (reply["offset"], reply["epoch"]) == (5, ok["epoch"])
            await publish(pub, "tiny.r", 6)  # live delivery still starts after the ok
            assert (await late.next_message())["offset"] == 6
        text = hnode.metrics.render().decode()
        assert 'wsbroker_recoveries_total{result="not_recovered"} 1.0' in text


async def test_since_is_ignored_on_a_channel_without_history(hnode: Node) -> None:
    async with clients(hnode, PUBLISHER) as (pub,):
        reply = await pub.request("subscribe", channel="news", since={"offset": 3, "epoch": "e"})
        assert reply == {"type": "ok", "id": 1, "channel": "news"}


async def test_recovery_while_publishing_goes_on_has_no_gap_and_no_duplicate(
        start_node: NodeFactory, engine: dict[str, Any]) -> None:
    """A subscriber recovers again and again while another node keeps publishing."""
    quick = {**engine, "rate_limit": RateLimit(0, 0)}
    other = await start_node(**quick, node_id="publisher")
    here = await start_node(**quick) if "redis_url" in engine else other
    async with clients(other, PUBLISHER) as (pub,):
        ok = await pub.request("history", channel="chat.busy", limit=1)
        stop = asyncio.Event()

        async def keep_publishing() -> None:
            index = 0
            while not stop.is_set():
                index += 1
                await publish(pub, "chat.busy", index)

        publisher = asyncio.create_task(keep_publishing())
        try:
            last = 0
            for _round in range(40):
                async with clients(here, make_token("again")) as (client,):
                    await client.send({"op": "subscribe", "id": 1, "channel": "chat.busy",
                                       "since": {"offset": last, "epoch": ok["epoch"]}})
                    reply = await client.receive()
                    assert reply["recovered"] is True, reply
                    target = reply["offset"] + 20
                    while last < target:
                        message = await client.next_message()
                        assert message["offset"] == last + 1, (message, last)
                        last = message["offset"]
        finally:
            stop.set()
            await publisher


async def test_backend_fcall_records_history(hnode: Node, engine: dict[str, Any]) -> None:
    if "redis_url" not in engine:
        pytest.skip("FCALL is the Redis backplane's backend interface")
    backend = aioredis.Redis.from_url(engine["redis_url"])
    async with clients(hnode, make_token("sub")) as (sub,):
        await sub.subscribe("chat.backend")
        try:
            reply = await backend.fcall(  # type: ignore[misc]
                "wsb_publish", 2, "{h:chat.backend}:s", "{h:chat.backend}:m",
                '{"text":"hi"}', 100, 0)
            assert reply[0] == 1
            with pytest.raises(aioredis.ResponseError, match="JSON"):
                await backend.fcall(  # type: ignore[misc]
                    "wsb_publish", 2, "{h:chat.backend}:s", "{h:chat.backend}:m",
                    "not json", 100, 0)
            with pytest.raises(aioredis.ResponseError, match="keys must be"):
                await backend.fcall(  # type: ignore[misc]
                    "wsb_publish", 2, "{h:chat.backend}:s", "{h:chat.other}:m", "1", 100, 0)
        finally:
            await backend.aclose()
        assert await sub.next_message() == {"type": "message", "channel": "chat.backend",
                                            "data": {"text": "hi"}, "offset": 1}
        page = await sub.request("history", channel="chat.backend")
        assert [m["offset"] for m in page["messages"]] == [1]


@pytest.mark.parametrize("forged", ["bogus", None])
async def test_a_made_up_envelope_is_dropped_and_changes_nothing(
        hnode: Node, forged: str | None) -> None:
    """A raw publish of an envelope with an offset no stream explains (same or other epoch)."""
    async with clients(hnode, PUBLISHER) as (pub,):
        ok = await pub.subscribe("chat.f")
        await publish(pub, "chat.f", 1)
        epoch = forged or ok["epoch"]
        await hnode.backplane.publish(
            "chat.f", b'wsb1{"data":"fake","offset":99,"epoch":"%s"}' % epoch.encode())
        await publish(pub, "chat.f", 2)
        assert [m["data"] for m in await messages(pub, 2)] == [1, 2]
        text = hnode.metrics.render().decode()
        assert 'wsbroker_messages_dropped_total{reason="out_of_sequence"} 1.0' in text
        assert (await pub.request("history", channel="chat.f"))["offset"] == 2


async def test_publish_command_through_a_node_prints_the_offset(start_node: NodeFactory) -> None:
    node = await start_node(history=RULES)
    for expected in ("1\n", "2\n"):
        run = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "wsbroker", "publish", "chat.ws", '{"a":1}',
             "--url", ws_url(node), "--token", PUBLISHER],
            capture_output=True, text=True, timeout=30, env=clean_env())
        assert (run.returncode, run.stdout) == (0, expected), run.stderr


async def test_a_replay_larger_than_the_send_buffer_is_not_recovered(
        start_node: NodeFactory) -> None:
    node = await start_node(history=RULES, max_send_buffer=4096, rate_limit=RateLimit(0, 0))
    async with clients(node, PUBLISHER) as (pub,):
        ok = await pub.request("history", channel="chat.big")
        for _ in range(60):
            await publish(pub, "chat.big", "x" * 100)
        reply = await pub.request("subscribe", channel="chat.big",
                                  since={"offset": 0, "epoch": ok["epoch"]})
        assert (reply["recovered"], reply["offset"]) == (False, 60)
        small = await pub.request("subscribe", channel="chat.small",
                                  since={"offset": 0, "epoch": "unknown"})
        assert small["recovered"] is False
