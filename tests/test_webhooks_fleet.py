"""Webhook occupancy across a fleet (SPEC §13): one ``channel_occupied`` per 0→1,
one ``channel_vacated`` after the vacate delay, decided atomically in a real
Redis even when clients join on different nodes at the same moment."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import pytest

from tests.conftest import NodeFactory, ws_url
from tests.helpers import SECRET, Client, ServerProcess, eventually, make_token
from tests.redis_cluster import LocalCluster
from tests.redis_server import RedisServer
from tests.webhook_receiver import Receiver
from wsbroker.channels import PatternSet
from wsbroker.server import Node

HOOK_SECRET = "whsec_" + base64.b64encode(b"f" * 32).decode()
DELAY = 0.5

Fleet = Callable[..., Awaitable[list[Node]]]


@pytest.fixture
async def fleet(redis_server: RedisServer, start_node: NodeFactory, receiver: Receiver) -> Fleet:
    """Nodes on one Redis, all sending webhooks to the one receiver."""

    async def start(count: int, **overrides: Any) -> list[Node]:
        settings: dict[str, Any] = {
            "redis_url": redis_server.url, "webhook_url": receiver.url,
            "webhook_secret": (HOOK_SECRET,), "webhook_vacate_delay": DELAY,
            "webhook_retry_delays": (0.05,), **overrides,
        }
        return [await start_node(**{"node_id": f"node-{index}", **settings})
                for index in range(1, count + 1)]

    return start


def settled(nodes: Iterable[Node]) -> Callable[[], bool]:
    """True once no node owes an event: a count taken then is final."""
    return lambda: all(node.webhooks is not None and node.webhooks.settled for node in nodes)


def kinds(receiver: Receiver, channel: str) -> list[str]:
    return [event["type"] for request in receiver.requests for event in request.events
            if event["channel"] == channel]


async def test_concurrent_joins_on_three_nodes_give_one_occupied_and_one_vacated(
    fleet: Fleet, receiver: Receiver
) -> None:
    nodes = await fleet(3)
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(Client.connect(ws_url(node), make_token()))
                   for node in nodes for _ in range(2)]
        for round_ in range(3):
            channel = f"room.{round_}"
            await asyncio.gather(*(client.subscribe(channel) for client in clients))
            occupied = await receiver.next_event()
            assert occupied["type"] == "channel_occupied"
            await asyncio.gather(*(client.request("unsubscribe", channel=channel)
                                   for client in clients))
            vacated = await receiver.next_event()
            assert (vacated["type"], vacated["channel"]) == ("channel_vacated", channel)
            assert vacated["time_ms"] - occupied["time_ms"] >= DELAY * 1000
            await eventually(settled(nodes))
            assert kinds(receiver, channel) == ["channel_occupied", "channel_vacated"]


async def test_vacated_only_after_the_delay_and_not_if_reoccupied_on_another_node(
    fleet: Fleet, receiver: Receiver
) -> None:
    first, second = await fleet(2)
    async with Client.connect(ws_url(first), make_token()) as a, \
            Client.connect(ws_url(second), make_token()) as b:
        await a.subscribe("room.1")
        assert (await receiver.next_event())["type"] == "channel_occupied"
        await a.request("unsubscribe", channel="room.1")
        await asyncio.sleep(DELAY / 3)
        await b.subscribe("room.1")  # back within the delay, elsewhere: neither event
        await asyncio.sleep(DELAY * 1.5)
        left = time.monotonic()
        await b.request("unsubscribe", channel="room.1")
        vacated = await receiver.next_event()
        waited = time.monotonic() - left
    assert vacated["type"] == "channel_vacated"
    assert DELAY <= waited < DELAY + 1.0
    await eventually(settled([first, second]))
    assert kinds(receiver, "room.1") == ["channel_occupied", "channel_vacated"]


async def test_without_redis_the_node_decides_alone(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    node = await start_node(webhook_url=receiver.url, webhook_secret=(HOOK_SECRET,),
                            webhook_vacate_delay=DELAY)
    async with Client.connect(ws_url(node), make_token()) as a, \
            Client.connect(ws_url(node), make_token()) as b:
        await asyncio.gather(a.subscribe("room.1"), b.subscribe("room.1"))
        await a.request("unsubscribe", channel="room.1")
        await b.request("unsubscribe", channel="room.1")
        await b.subscribe("room.1")  # within the delay
        left = time.monotonic()
        await b.request("unsubscribe", channel="room.1")
        events = await receiver.next_events(2)
        waited = time.monotonic() - left
    assert [event["type"] for event in events] == ["channel_occupied", "channel_vacated"]
    assert DELAY <= waited < DELAY + 1.0
    await eventually(settled([node]))
    assert kinds(receiver, "room.1") == ["channel_occupied", "channel_vacated"]


async def test_a_node_that_dies_has_its_channels_vacated_after_the_ttl(
    fleet: Fleet, receiver: Receiver, redis_server: RedisServer,
    server_process: Callable[..., ServerProcess],
) -> None:
    [survivor] = await fleet(1, presence_ttl=1.0)
    doomed = server_process(
        "--jwt-secret", SECRET, "--redis-url", redis_server.url, "--node-id", "doomed",
        "--webhook-url", receiver.url, "--webhook-secret", HOOK_SECRET,
        "--webhook-vacate-delay", str(DELAY), "--presence-ttl", "1s",
    )
    async with Client.connect(doomed.url, make_token()) as client:
        await client.subscribe("room.1")
        assert (await receiver.next_event())["type"] == "channel_occupied"
        doomed.signal(signal.SIGKILL)
        killed = time.monotonic()
        vacated = await receiver.next_event(timeout=10)
    waited = time.monotonic() - killed
    assert (vacated["type"], vacated["channel"]) == ("channel_vacated", "room.1")
    assert waited < 1.0 + DELAY + 2.0, f"vacated {waited:.1f}s after the node died"
    await eventually(settled([survivor]))
    assert kinds(receiver, "room.1") == ["channel_occupied", "channel_vacated"]


async def test_client_publish_only_when_enabled(fleet: Fleet, receiver: Receiver) -> None:
    [quiet] = await fleet(1)
    [chatty] = await fleet(1, node_id="chatty", webhook_events=("client_publish",))
    token = make_token(publish=[">"])
    async with Client.connect(ws_url(quiet), token) as a, \
            Client.connect(ws_url(chatty), token) as b:
        await a.request("publish", channel="news", data="from quiet")
        await b.request("publish", channel="news", data={"from": "chatty"})
        event = await receiver.next_event()
    assert event == {"type": "client_publish", "channel": "news", "user": "alice",
                     "data": {"from": "chatty"}, "time_ms": event["time_ms"]}
    await eventually(settled([quiet, chatty]))
    assert kinds(receiver, "news") == ["client_publish"]


async def test_member_added_and_removed_once_per_user_across_nodes(
    fleet: Fleet, receiver: Receiver
) -> None:
    nodes = await fleet(3, presence=PatternSet.parse(["chat.>"]))
    async with contextlib.AsyncExitStack() as stack:
        alices = [await stack.enter_async_context(Client.connect(ws_url(node), make_token()))
                  for node in nodes for _ in range(2)]
        bob = await stack.enter_async_context(
            Client.connect(ws_url(nodes[0]), make_token("bob")))
        await asyncio.gather(*(alice.subscribe("chat.1") for alice in alices))
        await bob.subscribe("chat.1")
        await alices[0].subscribe("plain")  # not a presence channel: no member events
        await eventually(lambda: len(members(receiver)) == 2)
        assert sorted(members(receiver)) == [("member_added", "alice"), ("member_added", "bob")]
        await asyncio.gather(*(alice.request("unsubscribe", channel="chat.1")
                               for alice in alices[1:]))
        left = time.monotonic()
        await alices[0].request("unsubscribe", channel="chat.1")  # alice's last one
        await eventually(lambda: len(members(receiver)) == 3)
        waited = time.monotonic() - left
        await eventually(settled(nodes))
    assert members(receiver)[2:] == [("member_removed", "alice")]
    assert len(members(receiver)) == 3
    assert DELAY <= waited < DELAY + 1.0
    assert all(channel == "chat.1" for channel in member_channels(receiver))


def members(receiver: Receiver) -> list[tuple[str, str]]:
    return [(event["type"], event["user"]) for request in receiver.requests
            for event in request.events if event["type"].startswith("member_")]


def member_channels(receiver: Receiver) -> list[str]:
    return [event["channel"] for request in receiver.requests for event in request.events
            if event["type"].startswith("member_")]


async def test_on_a_redis_cluster_each_shard_gives_one_occupied_and_one_vacated(
    redis_cluster_module: LocalCluster, start_node: NodeFactory, receiver: Receiver
) -> None:
    nodes = [await start_node(node_id=f"cnode-{index}", redis_url=redis_cluster_module.url,
                              redis_cluster=True, webhook_url=receiver.url,
                              webhook_secret=(HOOK_SECRET,), webhook_vacate_delay=DELAY)
             for index in range(3)]
    channels = redis_cluster_module.names_per_shard("hooks", prefix="ws:")
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(Client.connect(ws_url(node), make_token()))
                   for node in nodes]

        async def each(client: Client, op: str) -> None:
            for channel in channels:
                assert (await client.request(op, channel=channel))["type"] == "ok"

        await asyncio.gather(*(each(client, "subscribe") for client in clients))
        await asyncio.gather(*(each(client, "unsubscribe") for client in clients))
        await receiver.next_events(2 * len(channels))
        await eventually(settled(nodes))
    for channel in channels:
        assert kinds(receiver, channel) == ["channel_occupied", "channel_vacated"]


async def test_a_draining_node_leaves_its_vacancy_to_the_others(
    fleet: Fleet, receiver: Receiver
) -> None:
    leaving, staying = await fleet(2, drain_seconds=0.1)
    async with Client.connect(ws_url(leaving), make_token()) as client:
        await client.subscribe("room.1")
        assert (await receiver.next_event())["type"] == "channel_occupied"
        await leaving.drain()
    drained = time.monotonic()
    vacated = await receiver.next_event()
    assert (vacated["type"], vacated["channel"]) == ("channel_vacated", "room.1")
    assert time.monotonic() - drained < DELAY + 2.0
    await eventually(settled([staying]))
    assert kinds(receiver, "room.1") == ["channel_occupied", "channel_vacated"]


async def test_after_redis_loses_its_data_held_channels_are_announced_again(
    fleet: Fleet, receiver: Receiver, redis_server: RedisServer
) -> None:
    [node] = await fleet(1, presence_ttl=1.5)
    async with Client.connect(ws_url(node), make_token()) as client:
        await client.subscribe("room.1")
        assert (await receiver.next_event())["type"] == "channel_occupied"
        redis_server.kill()
        redis_server.start()  # empty: no persistence
        again = await receiver.next_event()  # the node's refresh re-holds room.1
        assert (again["type"], again["channel"]) == ("channel_occupied", "room.1")
        await eventually(lambda: node.backplane.is_up)
        await client.request("unsubscribe", channel="room.1")
        vacated = await receiver.next_event()
    assert (vacated["type"], vacated["channel"]) == ("channel_vacated", "room.1")


async def test_member_events_without_redis(start_node: NodeFactory, receiver: Receiver) -> None:
    node = await start_node(webhook_url=receiver.url, webhook_secret=(HOOK_SECRET,),
                            webhook_vacate_delay=DELAY, presence=PatternSet.parse(["chat.>"]),
                            webhook_events=("member_added", "member_removed"))
    async with Client.connect(ws_url(node), make_token()) as a, \
            Client.connect(ws_url(node), make_token()) as b:
        await a.subscribe("chat.1")
        await b.subscribe("chat.1")
        await a.request("unsubscribe", channel="chat.1")
        await b.request("unsubscribe", channel="chat.1")
        events = await receiver.next_events(2)
    assert [(event["type"], event["user"]) for event in events] == [
        ("member_added", "alice"), ("member_removed", "alice")]
    await eventually(settled([node]))
    assert len(members(receiver)) == 2
