"""One behavioural suite for every presence store (memory, Redis, Redis Cluster).

The stores are driven directly, without WebSockets: what the presence service
relies on (presence/base.py) must hold for all three. Redis-only behaviour
(two nodes, expiry of a node that stopped refreshing, Redis down) runs against
a real ``redis-server``; the Redis store serves the cluster too, so the shared
tests run against a real three-master cluster. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson
import pytest
from redis.crc import key_slot

from tests.helpers import eventually
from tests.redis_cluster import LocalCluster
from tests.redis_server import RedisServer
from wsbroker.backplane import BackplaneUnavailable
from wsbroker.backplane.memory import MemoryBackplane
from wsbroker.channels import PatternSet
from wsbroker.config import Settings
from wsbroker.metrics import Metrics
from wsbroker.presence import (
    Member,
    PresenceService,
    PresenceStats,
    PresenceStore,
    create_presence_store,
)
from wsbroker.presence.memory import MemoryPresenceStore
from wsbroker.presence.redis import RedisPresenceStore
from wsbroker.presence.service import SLICES

pytestmark = pytest.mark.filterwarnings("error")  # no unclosed sockets, no stray warnings

PREFIX = "t:"


@dataclass
class Stores:
    """The store under test, and how to make a second node's store on the same Redis."""

    kind: str
    store: PresenceStore
    settings: Settings | None = None
    server: RedisServer | None = None
    others: list[PresenceStore] = field(default_factory=list)

    def redis_settings(self) -> Settings:
        if self.settings is None:
            pytest.skip("the in-process store is one node with no Redis, by design")
        return self.settings

    async def peer(self, **overrides: float) -> PresenceStore:
        """Another node's store on the same Redis (or cluster)."""
        settings = self.redis_settings()
        other = RedisPresenceStore(Settings(
            redis_url=settings.redis_url, redis_cluster=settings.redis_cluster,
            redis_prefix=PREFIX, node_id="peer",
            presence_ttl=overrides.get("ttl", settings.presence_ttl)))
        await other.start()
        self.others.append(other)
        return other


@pytest.fixture(params=["memory", "redis", "cluster"])
async def stores(request: pytest.FixtureRequest) -> AsyncIterator[Stores]:
    if request.param == "memory":
        this = Stores("memory", MemoryPresenceStore())
    else:
        if request.param == "cluster":
            cluster: LocalCluster = request.getfixturevalue("redis_cluster_module")
            settings = Settings(redis_url=cluster.url, redis_cluster=True, redis_prefix=PREFIX,
                                node_id="test")
            this = Stores("cluster", create_presence_store(settings), settings)
        else:
            server: RedisServer = request.getfixturevalue("redis_server")
            settings = Settings(redis_url=server.url, redis_prefix=PREFIX, node_id="test")
            this = Stores("redis", create_presence_store(settings), settings, server)
        assert isinstance(this.store, RedisPresenceStore)
    await this.store.start()
    try:
        yield this
    finally:
        for other in this.others:
            await other.stop()
        await this.store.stop()


def unique(channel: str, stores: Stores) -> str:
    """A channel name of this test's own (the cluster is shared by the module)."""
    return f"{channel}.{stores.kind}.{id(stores)}"


def decoded(members: list[bytes]) -> list[dict[str, object]]:
    return sorted((orjson.loads(member) for member in members), key=lambda m: str(m["client"]))


ALICE_1 = Member.of("c1", "alice", {"name": "Alice", "avatar": "🦊"})
ALICE_2 = Member.of("c2", "alice")
BOB = Member.of("c3", "bob", {"role": "admin"})


# -- every store -------------------------------------------------------------------


async def test_added_members_are_listed_with_their_info(stores: Stores) -> None:
    channel = unique("room", stores)
    for member in (ALICE_1, ALICE_2, BOB):
        await stores.store.add(channel, member)
    assert decoded(await stores.store.members(channel)) == [
        {"client": "c1", "user": "alice", "info": {"name": "Alice", "avatar": "🦊"}},
        {"client": "c2", "user": "alice"},
        {"client": "c3", "user": "bob", "info": {"role": "admin"}},
    ]
    assert await stores.store.stats(channel) == PresenceStats(clients=3, users=2)


async def test_a_channel_nobody_joined_is_empty(stores: Stores) -> None:
    channel = unique("empty", stores)
    assert await stores.store.members(channel) == []
    assert await stores.store.stats(channel) == PresenceStats(0, 0)


async def test_adding_a_client_again_replaces_it_and_counts_it_once(stores: Stores) -> None:
    channel = unique("room", stores)
    await stores.store.add(channel, ALICE_1)
    renamed = Member.of("c1", "alice", {"name": "Alice B."})
    await stores.store.add(channel, renamed)
    assert decoded(await stores.store.members(channel)) == [
        {"client": "c1", "user": "alice", "info": {"name": "Alice B."}}]
    assert await stores.store.stats(channel) == PresenceStats(1, 1)


async def test_users_are_counted_until_their_last_member_leaves(stores: Stores) -> None:
    channel = unique("room", stores)
    for member in (ALICE_1, ALICE_2, BOB):
        await stores.store.add(channel, member)
    await stores.store.remove(channel, ALICE_1)
    assert await stores.store.stats(channel) == PresenceStats(2, 2)
    await stores.store.remove(channel, BOB)
    assert await stores.store.stats(channel) == PresenceStats(1, 1)
    await stores.store.remove(channel, ALICE_2)
    assert await stores.store.stats(channel) == PresenceStats(0, 0)
    assert await stores.store.members(channel) == []


async def test_removing_twice_or_an_unknown_member_is_harmless(stores: Stores) -> None:
    channel = unique("room", stores)
    await stores.store.add(channel, BOB)
    await stores.store.remove(channel, ALICE_1)
    await stores.store.remove(channel, BOB)
    await stores.store.remove(channel, BOB)
    assert await stores.store.stats(channel) == PresenceStats(0, 0)


async def test_channels_are_separate(stores: Stores) -> None:
    a, b = unique("a", stores), unique("b", stores)
    await stores.store.add(a, ALICE_1)
    await stores.store.add(b, BOB)
    assert decoded(await stores.store.members(a)) == [orjson.loads(ALICE_1.json)]
    assert await stores.store.stats(b) == PresenceStats(1, 1)


async def test_refresh_returns_the_members_the_store_no_longer_has(stores: Stores) -> None:
    channel = unique("room", stores)
    await stores.store.add(channel, ALICE_1)
    other = unique("other", stores)
    await stores.store.add(other, BOB)
    lost = await stores.store.refresh({channel: [ALICE_1, BOB], other: [BOB, ALICE_2]})
    assert sorted(lost, key=str) == sorted([(channel, BOB), (other, ALICE_2)], key=str)
    assert await stores.store.refresh({}) == []
    assert await stores.store.stats(channel) == PresenceStats(1, 1)  # refresh adds nothing


async def test_thousands_of_members_on_one_channel(stores: Stores) -> None:
    channel = unique("big", stores)
    members = [Member.of(f"client-{i}", f"user-{i % 700}") for i in range(2500)]
    await asyncio.gather(*(stores.store.add(channel, member) for member in members))
    assert await stores.store.stats(channel) == PresenceStats(2500, 700)
    assert len(await stores.store.members(channel)) == 2500
    assert await stores.store.refresh({channel: members}) == []  # chunked over 1,000


# -- Redis and Redis Cluster: several nodes, expiry, outages ---------------------------


async def test_two_nodes_see_the_same_members(stores: Stores) -> None:
    other = await stores.peer()
    channel = unique("room", stores)
    await stores.store.add(channel, ALICE_1)
    await other.add(channel, BOB)
    assert decoded(await stores.store.members(channel)) == decoded(await other.members(channel))
    assert await other.stats(channel) == PresenceStats(2, 2)


async def test_members_a_node_stops_refreshing_expire_within_the_ttl(stores: Stores) -> None:
    dying = await stores.peer(ttl=1.0)
    channel = unique("room", stores)
    await dying.add(channel, ALICE_1)  # "dying" never refreshes: as if SIGKILLed
    await stores.store.add(channel, BOB)
    assert await stores.store.stats(channel) == PresenceStats(2, 2)
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def only_bob() -> bool:
        return await stores.store.stats(channel) == PresenceStats(1, 1)

    await eventually(only_bob, timeout=3)
    assert loop.time() - started <= 1.5
    assert decoded(await stores.store.members(channel)) == [orjson.loads(BOB.json)]


async def test_refresh_keeps_members_past_the_ttl(stores: Stores) -> None:
    store = await stores.peer(ttl=2.0)
    channel = unique("room", stores)
    await store.add(channel, ALICE_1)
    for _ in range(6):
        await asyncio.sleep(0.5)  # refreshed four times per TTL: 3 s in all
        assert await store.refresh({channel: [ALICE_1]}) == []
    assert await stores.store.stats(channel) == PresenceStats(1, 1)


async def test_refresh_works_after_redis_forgot_the_scripts(
    stores: Stores, request: pytest.FixtureRequest,
) -> None:
    stores.redis_settings()
    channel = unique("room", stores)
    await stores.store.add(channel, ALICE_1)
    assert await stores.store.refresh({channel: [ALICE_1, BOB]}) == [(channel, BOB)]
    servers: list[RedisServer] = (
        [stores.server] if stores.server is not None
        else list(request.getfixturevalue("redis_cluster_module").nodes))
    for server in servers:
        server.command("SCRIPT", "FLUSH")  # as after a restart or a failover
    assert await stores.store.refresh({channel: [ALICE_1, BOB]}) == [(channel, BOB)]
    assert await stores.store.stats(channel) == PresenceStats(1, 1)


async def test_keys_live_in_the_channels_slot_and_expire(stores: Stores) -> None:
    stores.redis_settings()
    store = stores.store
    assert isinstance(store, RedisPresenceStore)
    channel = unique("room", stores)
    keys = store.keys(channel)
    assert {key_slot(key) for key in keys} == {key_slot((PREFIX + channel).encode())}
    await store.add(channel, ALICE_1)
    if stores.server is not None:
        for key in keys:
            assert 0 < int(stores.server.command("PTTL", key)) <= 60_000


async def test_redis_down_fails_reads_and_adds_but_not_removes(stores: Stores) -> None:
    stores.redis_settings()
    if stores.server is None:
        pytest.skip("the shared cluster stays up; outages are single-Redis tests")
    channel = unique("room", stores)
    await stores.store.add(channel, ALICE_1)
    stores.server.kill()
    with pytest.raises(BackplaneUnavailable):
        await stores.store.members(channel)
    with pytest.raises(BackplaneUnavailable):
        await stores.store.stats(channel)
    with pytest.raises(BackplaneUnavailable):
        await stores.store.add(channel, BOB)
    with pytest.raises(BackplaneUnavailable):
        await stores.store.refresh({channel: [ALICE_1]})
    await asyncio.wait_for(stores.store.remove(channel, ALICE_1), 5)
    stores.server.start()  # empty: what it held is gone, and refresh says so
    assert await stores.store.refresh({channel: [ALICE_1]}) == [(channel, ALICE_1)]


# -- Redis Cluster: one shard down ------------------------------------------------------


async def test_a_shard_down_does_not_expire_the_other_shards_members(
    redis_cluster_module: LocalCluster,
) -> None:
    cluster = redis_cluster_module
    cluster.wait_ok()
    ttl = 2.0  # refreshed every 0.67 s
    settings = Settings(redis_url=cluster.url, redis_cluster=True, redis_prefix=PREFIX,
                        node_id="shards", presence=PatternSet.parse([">"]), presence_ttl=ttl)
    backplane = MemoryBackplane()  # presence needs no pub/sub here
    service = PresenceService(settings, backplane, Metrics())
    reader = create_presence_store(settings)
    channels = cluster.names_per_shard(f"shard.{id(cluster)}", prefix=PREFIX)
    await backplane.start()
    await service.start()
    victim = cluster.owner(PREFIX + channels[0])
    # Redis's setting for partial availability: without it every shard refuses
    # commands (CLUSTERDOWN) while one master is down, and nothing can be kept.
    for node in cluster.nodes:
        node.command("CONFIG", "SET", "cluster-require-full-coverage", "no")
    try:
        # Clients of one refresh slice, so that every tick's pipeline holds all three
        # channels and the shard that is down would fail the others' refresh too.
        candidates = (f"client-{i}" for i in range(10_000))
        clients = [client for client in candidates if hash(client) % SLICES == 0][:3]
        for channel, client in zip(channels, clients, strict=True):
            await service.join(channel, Member.of(client, client))
            assert await reader.stats(channel) == PresenceStats(1, 1)  # it knows every master
        victim.kill()
        await asyncio.sleep(ttl * 1.5)  # past the TTL: only refreshes keep members alive
        for channel in channels[1:]:
            assert await reader.stats(channel) == PresenceStats(1, 1)
        with pytest.raises(BackplaneUnavailable):
            await reader.stats(channels[0])
    finally:
        victim.start()  # same port and directory: it reloads nodes.conf, empty of data
        for node in cluster.nodes:
            node.command("CONFIG", "SET", "cluster-require-full-coverage", "yes")
        await asyncio.to_thread(cluster.wait_ok)
    try:
        # The restarted shard lost its entries; the node's refresh writes them back.
        async def restored() -> bool:
            try:
                return await reader.stats(channels[0]) == PresenceStats(1, 1)
            except BackplaneUnavailable:
                return False

        await eventually(restored, timeout=10)
    finally:
        await service.stop()
        await reader.stop()
        await backplane.stop()
