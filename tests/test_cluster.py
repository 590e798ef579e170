"""The Redis Cluster backplane against a real three-master cluster on loopback.

Nodes run in-process with ``redis_cluster=True``; backends publish with
``SPUBLISH`` through redis-py's own cluster client, as a service would. Channel
names are picked so that each of the three masters owns one. A shard is
SIGKILLed and restarted on the same port (it reloads its nodes.conf and the
cluster heals), a slot is migrated with ``CLUSTER SETSLOT``, and a replica is
promoted with ``CLUSTER FAILOVER`` (on a cluster of its own). Engine-level
tests drive a bare ClusterBackplane. Every wait is bounded; sleeps only pace
polls of external state.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
from redis.asyncio.cluster import RedisCluster

from tests.conftest import NodeFactory, http_url, ws_url
from tests.helpers import Client, eventually, http_status, make_token
from tests.redis_cluster import ClusterNode, LocalCluster
from wsbroker.backplane import BackplaneUnavailable, create_backplane
from wsbroker.backplane.cluster import ClusterBackplane
from wsbroker.config import Settings
from wsbroker.server import Node

pytestmark = pytest.mark.filterwarnings("error")  # no unclosed sockets, no stray warnings

PREFIX = "ws:"


@pytest.fixture(scope="module")
def cluster(redis_cluster_module: LocalCluster) -> LocalCluster:
    """One cluster for the module; the tests that break it heal it before returning."""
    return redis_cluster_module


@pytest.fixture
async def backend(cluster: LocalCluster) -> AsyncIterator[RedisCluster]:
    """A backend service's client: redis-py's cluster client, routing by slot."""
    cluster.wait_ok()
    client = RedisCluster.from_url(cluster.url)
    try:
        yield client
    finally:
        await client.aclose()


async def start_cluster_nodes(start_node: NodeFactory, cluster: LocalCluster,
                              count: int) -> list[Node]:
    return [await start_node(redis_url=cluster.url, redis_cluster=True,
                             node_id=f"node-{index + 1}") for index in range(count)]


def backplane(node: Node) -> ClusterBackplane:
    engine = node.backplane
    assert isinstance(engine, ClusterBackplane)
    return engine


async def readyz_is(url: str, status: int) -> bool:
    return await http_status(url + "/readyz") == status


def test_the_cluster_flag_selects_the_cluster_engine() -> None:
    engine = create_backplane(Settings(redis_url="redis://127.0.0.1:1", redis_cluster=True))
    assert isinstance(engine, ClusterBackplane)


async def test_backend_spublish_reaches_two_nodes_on_every_shard(
    cluster: LocalCluster, backend: RedisCluster, start_node: NodeFactory,
) -> None:
    channels = cluster.names_per_shard("prices", PREFIX)
    assert len({cluster.owner(PREFIX + c).port for c in channels}) == 3
    nodes = await start_cluster_nodes(start_node, cluster, 2)
    for node in nodes:
        # One subscriber link per master, opened at start: the node is ready.
        assert backplane(node).shards == {f"127.0.0.1:{n.port}": True for n in cluster.nodes}
        assert await http_status(http_url(node) + "/readyz") == 200
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(Client.connect(ws_url(node), make_token()))
                   for node in nodes]
        for client in clients:
            for channel in channels:
                await client.subscribe(channel)
        for index, channel in enumerate(channels):
            # SPUBLISH reaches the owner; both nodes' sharded subscriptions are there.
            assert await backend.spublish(PREFIX + channel, b'{"n": %d}' % index) == 2
        for client in clients:
            got = {}
            for _ in channels:
                message = await client.next_message()
                got[message["channel"]] = message["data"]
            assert got == {channel: {"n": index} for index, channel in enumerate(channels)}
        # Raw PUBLISH is not sharded pub/sub: it never reaches a cluster node.
        assert await backend.publish(PREFIX + channels[0], b'"classic"') == 0
        await backend.spublish(PREFIX + channels[0], b'"sharded"')
        for client in clients:
            assert (await client.next_message())["data"] == "sharded"


async def test_client_publish_reaches_the_other_node_with_from(
    cluster: LocalCluster, start_node: NodeFactory,
) -> None:
    channels = cluster.names_per_shard("chat", PREFIX)
    first, second = await start_cluster_nodes(start_node, cluster, 2)
    async with (
        Client.connect(ws_url(first), make_token("alice", publish=[">"])) as alice,
        Client.connect(ws_url(second), make_token("bob")) as bob,
    ):
        for channel in channels:
            await bob.subscribe(channel)
        for channel in channels:
            reply = await alice.request("publish", channel=channel, data={"to": channel})
            assert reply["type"] == "ok", reply
            assert await bob.next_message() == {"type": "message", "channel": channel,
                                                "data": {"to": channel}, "from": "alice"}


async def test_publish_command_spublishes_to_a_cluster(
    cluster: LocalCluster, start_node: NodeFactory,
) -> None:
    """`wsbroker publish --redis-cluster` is how a shell or a cron job feeds a cluster."""
    (node,) = await start_cluster_nodes(start_node, cluster, 1)
    channels = cluster.names_per_shard("cli", PREFIX)
    async with Client.connect(ws_url(node), make_token()) as client:
        for channel in channels:
            await client.subscribe(channel)
        for channel in channels:
            result = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "wsbroker", "publish", channel, '{"via": "cli"}',
                 "--redis-url", cluster.url, "--redis-cluster"],
                capture_output=True, text=True, timeout=30,
            )
            assert result.returncode == 0, result.stderr
            assert await client.next_message() == {"type": "message", "channel": channel,
                                                   "data": {"via": "cli"}}


async def test_one_sharded_subscription_per_node_and_channel(
    cluster: LocalCluster, backend: RedisCluster, start_node: NodeFactory,
) -> None:
    channels = cluster.names_per_shard("count", PREFIX)
    keys = [PREFIX + c for c in channels]
    first, second = await start_cluster_nodes(start_node, cluster, 2)
    async with contextlib.AsyncExitStack() as outer:
        b = await outer.enter_async_context(Client.connect(ws_url(second), make_token("b")))
        async with (
            Client.connect(ws_url(first), make_token("a1")) as a1,
            Client.connect(ws_url(first), make_token("a2")) as a2,
        ):
            for channel in channels:
                await a1.subscribe(channel)
                await a2.subscribe(channel)
            # Two local subscribers, one sharded subscription, on the owner only.
            assert cluster.shardnumsub(*keys) == dict.fromkeys(keys, 1)
            assert cluster.shardchannels("count.*") == set()  # the prefix is always applied
            for channel in channels:
                await b.subscribe(channel)
            assert cluster.shardnumsub(*keys) == dict.fromkeys(keys, 2)
            assert all(owner_only(cluster, key) for key in keys)
            # Each node keeps one subscriber connection per master.
            for master in cluster.nodes:
                clients = master.command("CLIENT", "LIST").decode()
                assert clients.count("name=wsbroker:node-1:sub") == 1
                assert clients.count("name=wsbroker:node-2:sub") == 1
            # One leaves: the node still holds its subscription for the other.
            await a1.request("unsubscribe", channel=channels[0])
            assert cluster.shardnumsub(keys[0]) == {keys[0]: 2}
        # The last local subscriber on the first node is gone: it drops each channel.
        await eventually(lambda: cluster.shardnumsub(*keys) == dict.fromkeys(keys, 1))
        for channel in channels:
            assert await backend.spublish(PREFIX + channel, b'"still"') == 1
            assert (await b.next_message())["channel"] == channel
    await eventually(lambda: cluster.shardchannels(PREFIX + "count.*") == set())


def owner_only(cluster: LocalCluster, key: str) -> bool:
    """Only the slot's owner holds the sharded subscription."""
    owner = cluster.owner(key)
    return all(key.encode() not in node.command("PUBSUB", "SHARDCHANNELS")
               for node in cluster.nodes if node is not owner)


async def test_a_killed_shard_comes_back_and_the_others_never_stop(
    cluster: LocalCluster, start_node: NodeFactory,
) -> None:
    channels = cluster.names_per_shard("live", PREFIX)
    (node,) = await start_cluster_nodes(start_node, cluster, 1)
    engine = backplane(node)
    # The victim is the node the URL names: the engine must map the cluster
    # through the others while it is gone.
    victim: ClusterNode = cluster.nodes[0]
    lost = channels[0]
    assert cluster.owner(PREFIX + lost) is victim
    survivors = channels[1:]
    async with (
        Client.connect(ws_url(node), make_token(publish=[">"])) as client,
        RedisCluster.from_url(cluster.url) as backend,
    ):
        for channel in channels:
            await client.subscribe(channel)

        victim.kill()
        try:
            await eventually(lambda: not engine.shards[f"127.0.0.1:{victim.port}"])
            await eventually(lambda: readyz_is(http_url(node), 503))
            # The other shards keep delivering, for backends and clients alike,
            # also once the cluster has marked the dead master as failed.
            for round_ in ("early", "late"):
                if round_ == "late":
                    await asyncio.to_thread(cluster.wait_state, cluster.nodes[1], "fail")
                for channel in survivors:
                    assert await cluster_spublish(cluster, channel, f'"{round_}"') == 1
                    assert await client.next_message() == {
                        "type": "message", "channel": channel, "data": round_}
                    reply = await client.request("publish", channel=channel, data="mine")
                    assert reply["type"] == "ok", reply
                    assert (await client.next_message())["data"] == "mine"
            # The dead shard's channels fail fast; the WebSocket stays open.
            reply = await client.request("publish", channel=lost, data="x")
            assert reply["type"] == "error" and reply["code"] == "unavailable"
            fresh_names = cluster.names_per_shard("fresh", PREFIX)
            fresh = fresh_names[cluster.nodes.index(victim)]
            reply = await client.request("subscribe", channel=fresh)
            assert reply["type"] == "error" and reply["code"] == "unavailable"
            # New subscriptions on the healthy shards are served as usual.
            for healthy in (name for name in fresh_names if name != fresh):
                reply = await client.request("subscribe", channel=healthy)
                assert reply["type"] == "ok", reply
                assert await cluster_spublish(cluster, healthy, '"new"') == 1
                assert await client.next_message() == {
                    "type": "message", "channel": healthy, "data": "new"}
        finally:
            victim.start()  # same port, same dir: it reloads nodes.conf
        await asyncio.to_thread(cluster.wait_ok)
        await eventually(lambda: engine.is_up, timeout=10)  # backoff caps at 5 s
        assert await http_status(http_url(node) + "/readyz") == 200
        # Its subscriptions came back with no client action.
        assert cluster.shardnumsub(PREFIX + lost) == {PREFIX + lost: 1}
        assert await backend.spublish(PREFIX + lost, b'"back"') == 1
        assert await client.next_message() == {"type": "message", "channel": lost,
                                               "data": "back"}
        reply = await client.request("publish", channel=lost, data="mine again")
        assert reply["type"] == "ok", reply
        assert (await client.next_message())["data"] == "mine again"


async def cluster_spublish(cluster: LocalCluster, channel: str, payload: str) -> int:
    """SPUBLISH on the owner, off the event loop (the synchronous test client)."""
    return await asyncio.to_thread(cluster.spublish, PREFIX + channel, payload)


async def test_a_migrated_slot_keeps_delivering(
    cluster: LocalCluster, start_node: NodeFactory,
) -> None:
    channel = cluster.names_per_shard("moving", PREFIX)[0]
    key = PREFIX + channel
    slot = cluster.slot(key)
    source = cluster.owner(key)
    target = next(node for node in cluster.nodes if node is not source)
    (node,) = await start_cluster_nodes(start_node, cluster, 1)
    async with (
        Client.connect(ws_url(node), make_token()) as client,
        RedisCluster.from_url(cluster.url) as backend,
    ):
        await client.subscribe(channel)
        try:
            move_slot(cluster, slot, source, target)
            # The old owner dropped us (sunsubscribe); the node re-subscribed on the new one.
            await eventually(lambda: cluster.shardnumsub(key) == {key: 1}
                             and cluster.owner(key) is target)
            assert key.encode() not in source.command("PUBSUB", "SHARDCHANNELS")
            assert await backend.spublish(key, b'"moved"') == 1
            assert (await client.next_message())["data"] == "moved"
        finally:
            move_slot(cluster, slot, target, source)
        await eventually(lambda: key.encode() in source.command("PUBSUB", "SHARDCHANNELS"))
        assert await cluster_spublish(cluster, channel, '"home"') == 1
        assert (await client.next_message())["data"] == "home"
        assert backplane(node).is_up


async def test_a_node_publishing_to_a_moved_slot_follows_moved(
    cluster: LocalCluster, start_node: NodeFactory,
) -> None:
    """The publishing node's slot map is stale after the move: the old owner answers
    MOVED inside the shard's publish pipeline, and the publish is re-routed."""
    channel = cluster.names_per_shard("forward", PREFIX)[0]
    key = PREFIX + channel
    slot = cluster.slot(key)
    source = cluster.owner(key)
    target = next(node for node in cluster.nodes if node is not source)
    subscriber_node, publisher_node = await start_cluster_nodes(start_node, cluster, 2)
    async with Client.connect(ws_url(subscriber_node), make_token()) as client:
        await client.subscribe(channel)
        try:
            move_slot(cluster, slot, source, target)
            await eventually(lambda: cluster.shardnumsub(key) == {key: 1})
            await publisher_node.backplane.publish(channel, b'"forwarded"')
            assert (await client.next_message())["data"] == "forwarded"
        finally:
            move_slot(cluster, slot, target, source)


def move_slot(cluster: LocalCluster, slot: int, source: ClusterNode,
              target: ClusterNode) -> None:
    """Hand ``slot`` (no keys in it) from ``source`` to ``target``, telling every master."""
    source_id = source.command("CLUSTER", "MYID").decode()
    target_id = target.command("CLUSTER", "MYID").decode()
    target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    target.command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    source.command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    for node in cluster.nodes:
        if node is not source and node is not target:
            node.command("CLUSTER", "SETSLOT", slot, "NODE", target_id)


async def test_a_failover_moves_subscriptions_to_the_promoted_replica(
    cluster_with_replica: tuple[LocalCluster, ClusterNode], start_node: NodeFactory,
) -> None:
    local, replica = cluster_with_replica
    old_master = local.nodes[1]
    channels = local.names_per_shard("fo", PREFIX)
    moving, staying = channels[1], channels[0]
    (node,) = await start_cluster_nodes(start_node, local, 1)
    engine = backplane(node)
    assert set(engine.shards) == {f"127.0.0.1:{n.port}" for n in local.nodes}  # masters only
    async with (
        Client.connect(ws_url(node), make_token()) as client,
        RedisCluster.from_url(local.url) as backend,
    ):
        await client.subscribe(moving)
        await client.subscribe(staying)
        # A graceful manual failover: the replica takes the slots, the old
        # master turns replica and drops its sharded subscribers (sunsubscribe).
        await asyncio.to_thread(local.failover, replica)
        assert local.owner(PREFIX + moving) is replica
        await eventually(lambda: local.shardnumsub(PREFIX + moving) == {PREFIX + moving: 1})
        await eventually(lambda: engine.is_up and f"127.0.0.1:{replica.port}" in engine.shards
                         and f"127.0.0.1:{old_master.port}" not in engine.shards)
        # The backend's client may still send to the old master (now a replica):
        # Redis relays SPUBLISH across the shard, so it is delivered all the same
        # (the reply counts that node's own subscribers only).
        await backend.spublish(PREFIX + moving, b'"promoted"')
        assert (await client.next_message())["data"] == "promoted"
        assert await cluster_spublish(local, staying, '"unmoved"') == 1
        assert (await client.next_message())["data"] == "unmoved"


class Recorder:
    """What an engine hands to the hub, for the engine-level tests."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.states: list[bool] = []

    def on_message(self, channel: str, payload: bytes) -> None:
        self.messages.append((channel, payload))

    def on_state(self, up: bool) -> None:
        self.states.append(up)


@pytest.fixture
async def engine(cluster: LocalCluster) -> AsyncIterator[tuple[ClusterBackplane, Recorder]]:
    """A bare cluster engine (no WebSockets), with a fast PING watchdog."""
    cluster.wait_ok()
    bare = ClusterBackplane(Settings(redis_url=cluster.url, redis_cluster=True,
                                     redis_prefix=PREFIX, node_id="bare"))
    bare.ping_interval, bare.ping_timeout = 0.2, 0.3
    rec = Recorder()
    bare.bind(rec.on_message, rec.on_state)
    await bare.start()
    try:
        assert rec.states == [True]
        yield bare, rec
    finally:
        await bare.stop()


async def test_subscribe_returns_confirmed_and_a_cancelled_one_is_dropped(
    cluster: LocalCluster, engine: tuple[ClusterBackplane, Recorder],
) -> None:
    bare, rec = engine
    channels = [f"conf.{i}" for i in range(30)]
    for channel in channels:
        await bare.subscribe(channel)
        # Confirmed means the owner already holds it: SPUBLISH right now counts 1.
        assert await cluster_spublish(cluster, channel, "1") == 1
    await eventually(lambda: len(rec.messages) == len(channels))
    assert {cluster.owner(PREFIX + c).port for c in channels} == {
        n.port for n in cluster.nodes}
    for channel in channels:
        await bare.unsubscribe(channel)
    assert cluster.shardchannels(PREFIX + "conf.*") == set()

    task = asyncio.create_task(bare.subscribe("abandoned"))
    await asyncio.sleep(0)  # SSUBSCRIBE is written; the call awaits its confirmation
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The engine drops what Redis confirmed but nobody wants.
    await eventually(lambda: cluster.shardchannels(PREFIX + "abandoned") == set())
    await bare.subscribe("after")
    await bare.publish("abandoned", b"x")
    await bare.publish("after", b"y")
    await eventually(lambda: ("after", b"y") in rec.messages)
    assert [m for m in rec.messages if m[0] == "abandoned"] == []


async def test_a_channel_unsubscribed_while_it_is_rerouted_stays_unsubscribed(
    cluster: LocalCluster, engine: tuple[ClusterBackplane, Recorder],
) -> None:
    """The keeper re-routes a channel whose slot changed owner while the client
    unsubscribes it: the re-route must not resurrect it (a leaked SSUBSCRIBE)."""
    from redis.crc import key_slot

    bare, _ = engine
    channel = "rerouted"
    key = (PREFIX + channel).encode()
    await bare.subscribe(channel)
    source = bare._owner[key]
    other = next(shard for shard in bare._shards.values() if shard is not source)
    link = source.link
    assert link is not None and bare._slots is not None
    # The map now gives the slot to another master, while the old one kept our
    # subscription (a failover that master did not witness, say).
    bare._slots[key_slot(key)] = other.name
    async with link.lock:  # the re-route waits here to drop the channel from the source
        rerouting = asyncio.ensure_future(bare._reroute())
        for _ in range(3):  # let it run up to the lock (no clock involved)
            await asyncio.sleep(0)
        unsubscribing = asyncio.ensure_future(bare.unsubscribe(channel))
        await asyncio.sleep(0)
    await asyncio.wait_for(asyncio.gather(rerouting, unsubscribing), 5)
    assert key not in bare._owner and channel not in bare.channels
    assert cluster.shardnumsub(PREFIX + channel) == {PREFIX + channel: 0}


async def test_a_silent_shard_is_detected_by_ping_and_the_others_keep_working(
    cluster: LocalCluster, engine: tuple[ClusterBackplane, Recorder],
) -> None:
    bare, rec = engine
    channels = cluster.names_per_shard("quiet", PREFIX)
    for channel in channels:
        await bare.subscribe(channel)
    paused = cluster.nodes[2]
    # The shard stops answering but keeps its sockets open, like a partitioned host.
    paused.command("CLIENT", "PAUSE", "1500", "ALL")
    await eventually(lambda: rec.states == [True, False], timeout=3)
    assert bare.shards[f"127.0.0.1:{paused.port}"] is False
    await bare.publish(channels[0], b"meanwhile")  # another shard: unaffected
    await eventually(lambda: (channels[0], b"meanwhile") in rec.messages)
    with pytest.raises(BackplaneUnavailable):
        await bare.publish(channels[2], b"no")
    await eventually(lambda: rec.states == [True, False, True], timeout=10)
    await bare.publish(channels[2], b"again")
    await eventually(lambda: (channels[2], b"again") in rec.messages)


async def test_starting_while_the_seed_node_is_down_retries_until_it_is_back(
    cluster: LocalCluster,
) -> None:
    cluster.wait_ok()
    seed = cluster.nodes[0]
    bare = ClusterBackplane(Settings(redis_url=cluster.url, redis_cluster=True,
                                     redis_prefix=PREFIX, node_id="late"))
    rec = Recorder()
    bare.bind(rec.on_message, rec.on_state)
    seed.kill()
    try:
        await asyncio.wait_for(bare.start(), 5)
        assert not bare.is_up and rec.states == []
        with pytest.raises(BackplaneUnavailable):
            await bare.subscribe("x")
        with pytest.raises(BackplaneUnavailable):
            await bare.publish("x", b"1")
        await bare.unsubscribe("x")
    finally:
        seed.start()
    try:
        await eventually(lambda: rec.states == [True], timeout=10)
        await bare.subscribe("x")
        await bare.publish("x", b"1")
        await eventually(lambda: rec.messages == [("x", b"1")])
    finally:
        await asyncio.wait_for(bare.stop(), 2)
        await asyncio.to_thread(cluster.wait_ok)


async def test_a_slot_moving_during_sunsubscribe_does_not_desynchronise_the_link() -> None:
    """The reader's reply matching, driven without sockets (a state-machine test).

    The slot of K moves while we SUNSUBSCRIBE K and SSUBSCRIBE X: Redis pushes
    its own ``sunsubscribe K`` (taken for our reply), then answers our
    SUNSUBSCRIBE with MOVED. That stray MOVED must not be pinned on X.
    """
    from redis.asyncio.connection import Connection
    from redis.crc import key_slot
    from redis.exceptions import MovedError

    from wsbroker.backplane.link import SHARDED, Expect, Link

    bare = ClusterBackplane(Settings(redis_url="redis://127.0.0.1:1", redis_cluster=True,
                                     redis_prefix=PREFIX))
    try:
        shard = bare._shard("127.0.0.1", 1)
        link = Link(Connection(host="127.0.0.1", port=1))
        k, x, w = b"ws:k", b"ws:x", b"ws:w"
        assert key_slot(k) != key_slot(x)
        loop = asyncio.get_running_loop()
        unsub: asyncio.Future[Exception | None] = loop.create_future()
        sub: asyncio.Future[Exception | None] = loop.create_future()
        bare._names[x] = "x"
        bare._owner[x] = shard
        link.fifo.extend([Expect(SHARDED.unsubscribed, k, unsub),
                          Expect(SHARDED.subscribed, x, sub)])
        await shard.sub.confirm(link, [b"sunsubscribe", k, 1])
        shard.sub.refused(link, MovedError(f"{key_slot(k)} 127.0.0.1:2"))
        assert unsub.result() is None and not sub.done()
        await shard.sub.confirm(link, [b"ssubscribe", x, 1])
        assert sub.result() is None and not link.fifo
        # A MOVED for the head's own slot is the head's answer.
        refused: asyncio.Future[Exception | None] = loop.create_future()
        link.fifo.append(Expect(SHARDED.subscribed, x, refused))
        shard.sub.refused(link, MovedError(f"{key_slot(x)} 127.0.0.1:2"))
        assert isinstance(refused.result(), MovedError)
        # An unasked sunsubscribe of a wanted channel: Redis dropped it; re-route it.
        bare._names[w] = "w"
        bare._owner[w] = shard
        await shard.sub.confirm(link, [b"sunsubscribe", w, 0])
        assert w in bare._orphans and bare._stale.is_set()
    finally:
        await bare.stop()
