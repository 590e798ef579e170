"""The HTTP API across a fleet on a real redis-server (and Redis Cluster): publish,
idempotency, disconnect, channels and info answer for every node."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any

import pytest

from tests.api_client import KEY, api
from tests.conftest import NodeFactory, ws_url
from tests.helpers import Client, ServerProcess, eventually, free_port, make_token
from tests.redis_cluster import LocalCluster
from tests.redis_server import RedisServer
from wsbroker.channels import PatternSet
from wsbroker.history import HistoryRules
from wsbroker.registry import RedisRegistry
from wsbroker.server import Node


async def fleet(start_node: NodeFactory, url: str, count: int = 2,
                **overrides: Any) -> list[Node]:
    return [await start_node(node_id=f"node-{index}", redis_url=url, api_port=0,
                             api_key=(KEY,), **overrides)
            for index in range(1, count + 1)]


async def test_publish_reaches_subscribers_on_every_node(
    start_node: NodeFactory, redis_server: RedisServer
) -> None:
    one, two = await fleet(start_node, redis_server.url)
    async with (
        Client.connect(ws_url(one), make_token("alice")) as alice,
        Client.connect(ws_url(two), make_token("bob")) as bob,
        api(one) as client,
    ):
        await alice.subscribe("news.today")
        await bob.subscribe("news.today")
        status, answer = await client.post("/api/publish",
                                           {"channel": "news.today", "data": [1, 2]})
        assert (status, answer) == (200, {"channel": "news.today"})
        for subscriber in (alice, bob):
            assert await subscriber.next_message() == {
                "type": "message", "channel": "news.today", "data": [1, 2]}


async def test_publish_records_history_in_redis_for_every_node(
    start_node: NodeFactory, redis_server: RedisServer
) -> None:
    one, two = await fleet(start_node, redis_server.url,
                           history=HistoryRules.parse(["chat.>=100"]))
    async with (
        Client.connect(ws_url(two), make_token()) as bob,
        api(one) as first, api(two) as second,
    ):
        await bob.subscribe("chat.room")
        body = {"channel": "chat.room", "data": "x", "idempotency_key": "once"}
        status, answer = await first.post("/api/publish", body)
        assert status == 200 and answer["offset"] == 1 and answer["epoch"]
        assert await second.post("/api/publish", body) == (200, answer)  # fleet-wide, once
        assert (await bob.next_message())["offset"] == 1
        status, page = await second.get("/api/history?channel=chat.room")
        assert (status, page["offset"], page["epoch"]) == (200, 1, answer["epoch"])
        assert [m["data"] for m in page["messages"]] == ["x"]


async def test_the_same_idempotency_key_publishes_once_across_the_fleet(
    start_node: NodeFactory, redis_server: RedisServer
) -> None:
    one, two = await fleet(start_node, redis_server.url)
    body = {"channel": "orders.1", "data": "paid", "idempotency_key": "order-1-paid"}
    async with (
        Client.connect(ws_url(one), make_token()) as alice,
        api(one) as first, api(two) as second,
    ):
        await alice.subscribe("orders.1")
        answers = await asyncio.gather(first.post("/api/publish", body),
                                       second.post("/api/publish", body))
        answers.append(await second.post("/api/publish", body))
        assert answers == [(200, {"channel": "orders.1"})] * 3
        await first.post("/api/publish", {"channel": "orders.1", "data": "marker"})
        assert (await alice.next_message())["data"] == "paid"
        assert (await alice.next_message())["data"] == "marker"  # and no second "paid"


async def test_a_failed_idempotent_publish_can_be_retried(
    start_node: NodeFactory, redis_server: RedisServer
) -> None:
    [node] = await fleet(start_node, redis_server.url, count=1)
    body = {"channel": "orders.2", "data": "paid", "idempotency_key": "order-2"}
    async with api(node) as client:
        redis_server.kill()
        await eventually(lambda: not node.backplane.is_up)
        status, answer = await client.post("/api/publish", body)
        assert status == 503 and answer["error"]["code"] == "unavailable"
        redis_server.start()
        await eventually(lambda: node.backplane.is_up, timeout=10)
        async with Client.connect(ws_url(node), make_token()) as alice:
            await alice.subscribe("orders.2")
            assert await client.post("/api/publish", body) == (200, {"channel": "orders.2"})
            assert (await alice.next_message())["data"] == "paid"


async def test_disconnect_closes_the_user_on_every_node_and_no_one_else(
    start_node: NodeFactory, redis_server: RedisServer
) -> None:
    one, two = await fleet(start_node, redis_server.url)
    async with (
        Client.connect(ws_url(one), make_token("alice")) as alice_one,
        Client.connect(ws_url(two), make_token("alice")) as alice_two,
        Client.connect(ws_url(two), make_token("bob")) as bob,
        api(one) as client,
    ):
        await bob.subscribe("room.a")
        assert await client.post("/api/disconnect", {"user": "alice"}) == (
            200, {"user": "alice"})
        assert (await alice_one.closed())[0] == 4003
        assert (await alice_two.closed())[0] == 4003
        assert (await client.post("/api/publish", {"channel": "room.a", "data": 1}))[0] == 200
        assert (await bob.next_message())["data"] == 1


async def test_disconnect_reaches_a_node_that_started_while_redis_was_down(
    start_node: NodeFactory, redis_server: RedisServer
) -> None:
    redis_server.kill()
    [late] = await fleet(start_node, redis_server.url, count=1)
    redis_server.start()
    await eventually(lambda: late.backplane.is_up and late.control.listening, timeout=10)
    async with Client.connect(ws_url(late), make_token("alice")) as alice, api(late) as client:
        assert (await client.post("/api/disconnect", {"user": "alice"}))[0] == 200
        assert (await alice.closed())[0] == 4003


async def test_channels_and_info_answer_for_the_whole_fleet(
    start_node: NodeFactory, redis_server: RedisServer
) -> None:
    one, two = await fleet(start_node, redis_server.url)
    async with (
        Client.connect(ws_url(one), make_token()) as alice,
        Client.connect(ws_url(two), make_token()) as bob,
        api(one) as client,
    ):
        await alice.subscribe("room.b")
        await bob.subscribe("room.a")
        await bob.subscribe("room.b")
        assert await client.get("/api/channels") == (200, {"channels": ["room.a", "room.b"]})
        assert await client.get("/api/channels?pattern=room.>") == (
            200, {"channels": ["room.a", "room.b"]})
        status, answer = await client.get("/api/info")
        assert status == 200
        nodes = {report["node"]: report for report in answer["nodes"]}
        assert sorted(nodes) == ["node-1", "node-2"]
        # node-2 reports itself at start, then every 5 s; its first report may
        # predate bob, so only what it held then is certain.
        assert nodes["node-1"]["subscriptions"] == 1


async def test_a_stopped_node_leaves_info_at_once(
    start_node: NodeFactory, redis_server: RedisServer
) -> None:
    one, two = await fleet(start_node, redis_server.url)
    await eventually(lambda: reports_of(one, 2))
    await two.stop()
    async with api(one) as client:
        assert [n["node"] for n in (await client.get("/api/info"))[1]["nodes"]] == ["node-1"]


async def test_a_killed_node_drops_out_of_info_within_15_s(
    start_node: NodeFactory, redis_server: RedisServer,
    server_process: Callable[..., ServerProcess],
) -> None:
    [node] = await fleet(start_node, redis_server.url, count=1)
    victim = server_process("--redis-url", redis_server.url, "--node-id", "victim",
                            "--jwt-secret", "x" * 40)
    async with api(node) as client:
        async def members() -> list[str]:
            return [n["node"] for n in (await client.get("/api/info"))[1]["nodes"]]

        await eventually(lambda: _has(members, "victim"), timeout=10)
        victim.signal(signal.SIGKILL)
        victim.wait(5)
        killed = asyncio.get_running_loop().time()
        await eventually(lambda: _lacks(members, "victim"),
                         timeout=RedisRegistry.ttl + 2, every=0.25)
        assert asyncio.get_running_loop().time() - killed <= RedisRegistry.ttl + 1


async def test_presence_answers_for_members_on_every_node(
    start_node: NodeFactory, redis_server: RedisServer
) -> None:
    one, two = await fleet(start_node, redis_server.url,
                           presence=PatternSet.parse(["chat.>"]))
    async with (
        Client.connect(ws_url(one), make_token("alice")) as alice,
        Client.connect(ws_url(two), make_token("bob")) as bob,
        api(one) as client,
    ):
        await alice.subscribe("chat.room")
        await bob.subscribe("chat.room")

        async def both_listed() -> bool:
            _, answer = await client.get("/api/presence?channel=chat.room")
            return sorted(m["user"] for m in answer["members"]) == ["alice", "bob"]

        await eventually(both_listed, timeout=2)
        assert await client.get("/api/presence_stats?channel=chat.room") == (
            200, {"channel": "chat.room", "clients": 2, "users": 2})


async def test_redis_down_answers_503(start_node: NodeFactory, redis_server: RedisServer) -> None:
    [node] = await fleet(start_node, redis_server.url, count=1)
    redis_server.kill()
    await eventually(lambda: not node.backplane.is_up)
    async with api(node) as client:
        for method, path, body in [
            ("POST", "/api/publish", {"channel": "a", "data": 1}),
            ("POST", "/api/disconnect", {"user": "alice"}),
            ("GET", "/api/channels", None),
            ("GET", "/api/info", None),
        ]:
            status, answer = await client.call(method, path, body)
            assert (status, answer["error"]["code"]) == (503, "unavailable"), path
        status, answer = await client.post("/api/broadcast", {"channels": ["a"], "data": 1})
        assert status == 200 and answer["results"][0]["error"]["code"] == "unavailable"


# -- Redis Cluster --------------------------------------------------------------------


@pytest.fixture
def cluster(redis_cluster_module: LocalCluster) -> LocalCluster:
    redis_cluster_module.wait_ok()
    return redis_cluster_module


async def test_cluster_fleet_publishes_lists_channels_of_every_shard_and_disconnects(
    start_node: NodeFactory, cluster: LocalCluster
) -> None:
    one, two = await fleet(start_node, cluster.url, redis_cluster=True)
    channels = sorted(cluster.names_per_shard("api.room", prefix="ws:"))
    async with (
        Client.connect(ws_url(one), make_token("alice")) as alice,
        Client.connect(ws_url(two), make_token("bob")) as bob,
        api(two) as client,
    ):
        for channel in channels:
            await alice.subscribe(channel)
        assert await client.get("/api/channels?pattern=api.>") == (200, {"channels": channels})
        status, answer = await client.post("/api/broadcast", {"channels": channels, "data": 7})
        assert status == 200 and all("error" not in r for r in answer["results"])
        assert sorted([(await alice.next_message())["channel"] for _ in channels]) == channels
        status, answer = await client.get("/api/info")
        assert [n["node"] for n in answer["nodes"]] == ["node-1", "node-2"]
        assert (await client.post("/api/disconnect", {"user": "alice"}))[0] == 200
        assert (await alice.closed())[0] == 4003
        assert (await bob.request("ping"))["type"] == "ok"


async def reports_of(node: Node, count: int) -> bool:
    return len(await node.registry.nodes()) == count


async def _has(members: Callable[[], Any], name: str) -> bool:
    return name in await members()


async def _lacks(members: Callable[[], Any], name: str) -> bool:
    return name not in await members()


async def test_an_unreachable_cluster_answers_503_and_the_node_stops_cleanly(
    start_node: NodeFactory,
) -> None:
    [node] = await fleet(start_node, f"redis://127.0.0.1:{free_port()}/0", count=1,
                         redis_cluster=True)
    async with api(node) as client:
        for path in ("/api/info", "/api/channels"):
            status, answer = await client.get(path)
            assert (status, answer["error"]["code"]) == (503, "unavailable"), path
        status, answer = await client.post(
            "/api/publish", {"channel": "a", "data": 1, "idempotency_key": "k"})
        assert (status, answer["error"]["code"]) == (503, "unavailable")
    await node.stop()  # leaving the registry of an unreachable cluster raises nothing
