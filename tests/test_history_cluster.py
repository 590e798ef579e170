"""History on a real three-master Redis Cluster (SPEC §7): the Function library on
every master, history publishes and recovery on every shard, and backends that
FCALL it through a cluster client.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio.cluster import RedisCluster

from tests.conftest import NodeFactory, ws_url
from tests.helpers import Client, clean_env, eventually, make_token
from tests.redis_cluster import ClusterNode, LocalCluster
from wsbroker.history import HistoryRules, history_keys
from wsbroker.server import Node

pytestmark = pytest.mark.filterwarnings("error")

PREFIX = "ws:"
RULES = HistoryRules.parse(["chat.>=50"])


@pytest.fixture
async def backend(redis_cluster_module: LocalCluster) -> AsyncIterator[RedisCluster]:
    redis_cluster_module.wait_ok()
    client = RedisCluster.from_url(redis_cluster_module.url)
    try:
        yield client
    finally:
        await client.aclose()


async def cluster_node(start_node: NodeFactory, cluster: LocalCluster, name: str) -> Node:
    node = await start_node(redis_url=cluster.url, redis_cluster=True, history=RULES,
                            node_id=name)
    await eventually(lambda: all(
        master.command("FUNCTION", "LIST", "LIBRARYNAME", "wsbroker")
        for master in cluster.nodes))
    return node


def channels(cluster: LocalCluster) -> list[str]:
    """One fresh history channel per shard."""
    return cluster.names_per_shard(f"chat.{uuid.uuid4().hex[:8]}", PREFIX)


async def test_history_publish_and_read_on_every_shard(
        start_node: NodeFactory, redis_cluster_module: LocalCluster) -> None:
    cluster = redis_cluster_module
    here = await cluster_node(start_node, cluster, "here")
    there = await cluster_node(start_node, cluster, "there")
    async with (Client.connect(ws_url(here), make_token()) as sub,
                Client.connect(ws_url(there), make_token("p", publish=[">"])) as pub):
        for channel in channels(cluster):
            ok = await sub.subscribe(channel)
            for expected in (1, 2):
                reply = await pub.request("publish", channel=channel, data=expected)
                assert reply["offset"] == expected, reply
            assert [(await sub.next_message())["offset"] for _ in range(2)] == [1, 2]
            page = await sub.request("history", channel=channel)
            assert [m["data"] for m in page["messages"]] == [1, 2]
            assert page["epoch"] == ok["epoch"]
            # Keys live on the master that owns the channel's sharded pub/sub name.
            owner = cluster.owner(PREFIX + channel)
            assert owner.command("EXISTS", f"{{{PREFIX}{channel}}}:s") == 1


async def test_since_recovers_across_nodes_on_every_shard(
        start_node: NodeFactory, redis_cluster_module: LocalCluster) -> None:
    cluster = redis_cluster_module
    here = await cluster_node(start_node, cluster, "here")
    there = await cluster_node(start_node, cluster, "there")
    async with Client.connect(ws_url(there), make_token("p", publish=[">"])) as pub:
        for channel in channels(cluster):
            first = await pub.request("publish", channel=channel, data=1)
            page = await pub.request("history", channel=channel, limit=1)
            for value in (2, 3):
                await pub.request("publish", channel=channel, data=value)
            async with Client.connect(ws_url(here), make_token()) as late:
                await late.send({"op": "subscribe", "id": 1, "channel": channel,
                                 "since": {"offset": first["offset"], "epoch": page["epoch"]}})
                reply = await late.receive()
                assert (reply["recovered"], reply["offset"]) == (True, 3)
                assert [(await late.next_message())["data"] for _ in range(2)] == [2, 3]


async def test_backend_fcall_through_a_cluster_client(
        start_node: NodeFactory, redis_cluster_module: LocalCluster,
        backend: RedisCluster) -> None:
    cluster = redis_cluster_module
    node = await cluster_node(start_node, cluster, "here")
    async with Client.connect(ws_url(node), make_token()) as sub:
        for channel in channels(cluster):
            await sub.subscribe(channel)
            reply = await backend.fcall(  # type: ignore[misc]
                "wsb_spublish", 2, *history_keys((PREFIX + channel).encode()),
                '{"from":"backend"}', 50, 0)
            assert int(reply[0]) == 1
            assert await sub.next_message() == {"type": "message", "channel": channel,
                                                "data": {"from": "backend"}, "offset": 1}


async def test_publish_command_records_on_a_cluster(
        start_node: NodeFactory, redis_cluster_module: LocalCluster) -> None:
    cluster = redis_cluster_module
    node = await cluster_node(start_node, cluster, "here")
    (channel, *_) = channels(cluster)
    async with Client.connect(ws_url(node), make_token()) as sub:
        await sub.subscribe(channel)
        run = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "wsbroker", "publish", channel, "[1]", "--redis-url",
             cluster.url, "--redis-cluster", "--history", "chat.>=50"],
            capture_output=True, text=True, timeout=30, env=clean_env())
        assert (run.returncode, run.stdout) == (0, "1\n"), run.stderr
        assert (await sub.next_message())["offset"] == 1


async def test_node_recovers_a_shard_whose_link_dropped(
        start_node: NodeFactory, redis_cluster_module: LocalCluster,
        backend: RedisCluster) -> None:
    cluster = redis_cluster_module
    node = await cluster_node(start_node, cluster, "here")
    async with Client.connect(ws_url(node), make_token()) as sub:
        names = channels(cluster)
        for channel in names:
            await sub.subscribe(channel)
        for master in cluster.nodes:
            master.command("CLIENT", "KILL", "TYPE", "pubsub")
        for channel in names:  # published while the node's links reconnect
            for value in (1, 2):
                await backend.fcall(  # type: ignore[misc]
                    "wsb_spublish", 2, *history_keys((PREFIX + channel).encode()),
                    str(value), 50, 0)
        got: dict[str, list[int]] = {channel: [] for channel in names}
        for _ in range(2 * len(names)):
            message = await sub.next_message(timeout=15)
            got[message["channel"]].append(message["offset"])
        assert got == {channel: [1, 2] for channel in names}


async def test_history_survives_a_failover_with_the_same_epoch(
        start_node: NodeFactory, cluster_with_replica: tuple[LocalCluster, ClusterNode]) -> None:
    local, replica = cluster_with_replica
    channel = local.names_per_shard("chat.fo", PREFIX)[1]
    node = await cluster_node(start_node, local, "here")
    await eventually(lambda: bool(replica.command("FUNCTION", "LIST", "LIBRARYNAME",
                                                  "wsbroker")))  # replicated
    keys = history_keys((PREFIX + channel).encode())
    async with (Client.connect(ws_url(node), make_token()) as sub,
                RedisCluster.from_url(local.url) as backend):
        ok = await sub.subscribe(channel)
        for value in (1, 2):
            await backend.fcall("wsb_spublish", 2, *keys, str(value), 50, 0)  # type: ignore[misc]
        assert [(await sub.next_message())["offset"] for _ in range(2)] == [1, 2]
        await asyncio.to_thread(local.failover, replica)
        assert local.owner(PREFIX + channel) is replica
        reply = await backend.fcall("wsb_spublish", 2, *keys, "3", 50, 0)  # type: ignore[misc]
        assert int(reply[0]) == 3 and reply[1].decode() == ok["epoch"]
        assert (await sub.next_message(timeout=15))["offset"] == 3
        page = await sub.request("history", channel=channel)
        assert ([m["offset"] for m in page["messages"]], page["epoch"]) == ([1, 2, 3],
                                                                           ok["epoch"])
