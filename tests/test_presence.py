"""Presence and join/leave as clients see them (SPEC §11, issue 11).

Nodes run in-process on the in-process engine (one node: "every node" is that
one), on a real ``redis-server`` (two nodes) and on a real three-master Redis
Cluster; real ``wsbroker serve`` processes are SIGKILLed or drained with
SIGTERM. Clients are real WebSocket clients. Every wait is bounded; polls only
watch state no event exposes (another node's answers, a dead node's expiry).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import orjson
import pytest

from tests.conftest import NodeFactory, http_url, ws_url
from tests.helpers import (
    SECRET,
    Client,
    ServerProcess,
    eventually,
    http_get,
    make_token,
)
from tests.redis_cluster import LocalCluster
from tests.redis_server import RedisServer
from wsbroker import protocol
from wsbroker.auth import AuthError, Verifier
from wsbroker.backplane.memory import MemoryBackplane
from wsbroker.channels import PatternSet
from wsbroker.config import ConfigError, Settings, load_settings
from wsbroker.metrics import Metrics
from wsbroker.presence import Member, PresenceNotEnabled, PresenceService, PresenceStats
from wsbroker.presence.memory import MemoryPresenceStore
from wsbroker.server import Node

ROOM = "chat.room"
PRESENCE = PatternSet.parse(["chat.>"])

Fleet = Callable[..., Awaitable[list[Node]]]


@pytest.fixture(params=["memory", "redis", "cluster"])
def fleet(request: pytest.FixtureRequest) -> Fleet:
    """Two nodes of one fleet (the in-process engine: the same node twice).

    Redis is set up before ``start_node``, so the nodes stop before it does.
    """
    redis: dict[str, Any] = {}
    if request.param == "cluster":
        cluster: LocalCluster = request.getfixturevalue("redis_cluster_module")
        redis = {"redis_url": cluster.url, "redis_cluster": True}
    elif request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        redis = {"redis_url": server.url}
    start_node: NodeFactory = request.getfixturevalue("start_node")

    async def start(**overrides: Any) -> list[Node]:
        overrides = {"presence": PRESENCE, **redis, **overrides}
        if not redis:
            node = await start_node(**overrides)
            return [node, node]
        return [await start_node(node_id=f"node-{index}", **overrides) for index in (1, 2)]

    return start


@contextlib.asynccontextmanager
async def clients(*specs: tuple[Node, str]) -> AsyncIterator[list[Client]]:
    """Connected clients: one per (node, token)."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(Client.connect(ws_url(node), token))
               for node, token in specs]


def client_id(client: Client) -> str:
    assert client.welcome is not None
    return str(client.welcome["client"])


async def members_on(client: Client, channel: str = ROOM) -> list[dict[str, Any]]:
    reply = await client.request("presence", channel=channel)
    assert reply["type"] == "ok", reply
    assert reply["channel"] == channel
    return sorted(reply["members"], key=lambda member: str(member["client"]))


async def stats_on(client: Client, channel: str = ROOM) -> tuple[int, int]:
    reply = await client.request("presence_stats", channel=channel)
    assert reply["type"] == "ok", reply
    return reply["clients"], reply["users"]


async def within(seconds: float, condition: Callable[[], Awaitable[bool]]) -> None:
    await eventually(condition, timeout=seconds, every=0.01)


# -- presence -------------------------------------------------------------------


async def test_every_node_lists_every_member_once_with_its_info(fleet: Fleet) -> None:
    one, two = await fleet()
    alice = make_token("alice", info={"name": "Alice", "colour": "🟣"})
    async with clients((one, alice), (two, alice), (two, make_token("bob")),
                       (one, make_token("carol"))) as (a1, a2, bob, reader):
        for client in (a1, a2, bob):
            await client.subscribe(ROOM)
        await a1.subscribe(ROOM)  # idempotent: still one member
        expected: list[dict[str, Any]] = sorted([
            {"client": client_id(a1), "user": "alice", "info": {"name": "Alice", "colour": "🟣"}},
            {"client": client_id(a2), "user": "alice", "info": {"name": "Alice", "colour": "🟣"}},
            {"client": client_id(bob), "user": "bob"},
        ], key=lambda member: str(member["client"]))
        # Answered at once, the same on both nodes; the reader needs no subscription.
        assert await members_on(reader) == expected
        assert await members_on(bob) == expected
        assert await stats_on(reader) == (3, 2)
        assert await stats_on(a2) == (3, 2)


async def test_members_appear_and_vanish_within_a_second_on_every_node(fleet: Fleet) -> None:
    one, two = await fleet()
    async with clients((one, make_token("watcher"))) as (watcher,):
        async with clients((two, make_token("bob"))) as (bob,):
            await bob.subscribe(ROOM)
            await within(1, lambda: _stats_are(watcher, (1, 1)))
            await bob.request("unsubscribe", channel=ROOM)
            await within(1, lambda: _stats_are(watcher, (0, 0)))
            await bob.subscribe(ROOM)
            await within(1, lambda: _stats_are(watcher, (1, 1)))
        # bob disconnected
        await within(1, lambda: _stats_are(watcher, (0, 0)))
        assert await members_on(watcher) == []


async def _stats_are(client: Client, expected: tuple[int, int]) -> bool:
    return await stats_on(client) == expected


async def test_presence_needs_permission_and_a_presence_channel(start_node: NodeFactory) -> None:
    node = await start_node(presence=PRESENCE, history=())
    token = make_token("eve", channels=["chat.public", "news.>"])
    async with clients((node, token)) as (eve,):
        for op in ("presence", "presence_stats"):
            forbidden = await eve.request(op, channel="chat.secret")
            assert (forbidden["type"], forbidden["code"]) == ("error", "forbidden")
            off = await eve.request(op, channel="news.today")
            assert (off["type"], off["code"]) == ("error", "not_enabled")
            invalid = await eve.request(op, channel="chat..x")
            assert (invalid["type"], invalid["code"]) == ("error", "invalid_channel")
            missing = await eve.request(op)
            assert (missing["type"], missing["code"]) == ("error", "bad_request")
        assert await stats_on(eve, "chat.public") == (0, 0)


async def test_public_channels_count_as_subscribe_permission(start_node: NodeFactory) -> None:
    node = await start_node(presence=PRESENCE, public_channels=PatternSet.parse(["chat.lobby"]))
    async with clients((node, make_token("eve", channels=[]))) as (eve,):
        await eve.subscribe("chat.lobby")
        assert await stats_on(eve, "chat.lobby") == (1, 1)


async def test_without_presence_every_channel_is_not_enabled(node: Node) -> None:
    async with clients((node, make_token())) as (client,):
        reply = await client.request("presence", channel=ROOM)
        assert (reply["type"], reply["code"]) == ("error", "not_enabled")
    with pytest.raises(PresenceNotEnabled):
        await node.presence.members(ROOM)


async def test_a_refreshed_token_with_new_info_updates_the_member(fleet: Fleet) -> None:
    one, two = await fleet()
    async with clients((one, make_token("alice", info={"status": "away"})),
                       (two, make_token("bob"))) as (alice, bob):
        await alice.subscribe(ROOM)
        assert [m.get("info") for m in await members_on(bob)] == [{"status": "away"}]
        reply = await alice.request("auth", token=make_token("alice", info={"status": "busy"}))
        assert reply["type"] == "ok", reply
        assert [m.get("info") for m in await members_on(bob)] == [{"status": "busy"}]
        await alice.request("auth", token=make_token("alice"))  # no info at all now
        assert await members_on(bob) == [{"client": client_id(alice), "user": "alice"}]


async def test_a_refresh_that_drops_the_channel_removes_the_member(
    start_node: NodeFactory,
) -> None:
    node = await start_node(presence=PRESENCE)
    async with clients((node, make_token("alice")), (node, make_token("bob"))) as (alice, bob):
        await alice.subscribe(ROOM)
        await alice.request("auth", token=make_token("alice", channels=["other"]))
        assert (await alice.receive())["type"] == "unsubscribed"
        assert await stats_on(bob) == (0, 0)


async def test_the_node_service_answers_for_the_http_api(fleet: Fleet) -> None:
    one, two = await fleet()
    async with clients((one, make_token("alice", info={"n": 1}))) as (alice,):
        await alice.subscribe(ROOM)
        assert await two.presence.members(ROOM) == [
            {"client": client_id(alice), "user": "alice", "info": {"n": 1}}]
        assert await two.presence.stats(ROOM) == PresenceStats(clients=1, users=1)
        with pytest.raises(PresenceNotEnabled):
            await two.presence.stats("news.today")


async def test_members_metric_counts_this_nodes_members(start_node: NodeFactory) -> None:
    node = await start_node(presence=PRESENCE)
    async with clients((node, make_token("a")), (node, make_token("b"))) as (a, b):
        await a.subscribe(ROOM)
        await a.subscribe("chat.other")
        await b.subscribe(ROOM)
        await b.subscribe("news.today")  # no presence: not a member
        assert await _metric(node, "wsbroker_presence_members") == 3

    async def none_left() -> bool:
        return await _metric(node, "wsbroker_presence_members") == 0

    await eventually(none_left)


async def _metric(node: Node, name: str) -> float:
    _, _, body = await asyncio.to_thread(http_get, http_url(node) + "/metrics")
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


# -- the info claim -----------------------------------------------------------------


async def test_info_claim_is_an_object_of_at_most_1_kib() -> None:
    verifier = Verifier(Settings(jwt_secret=SECRET))
    fits = {"bio": "x" * (1024 - len('{"bio":""}'))}
    assert (await verifier.verify(make_token("u", info=fits))).info == fits
    assert (await verifier.verify(make_token("u"))).info is None
    # (Claims are parsed with orjson: an integer wider than 64 bits arrives as a float,
    # which encodes fine, so it is no longer a way to make `info` unencodable.)
    for bad in ({"bio": "x" * 1015}, ["not", "an", "object"], "text", None, 7):
        with pytest.raises(AuthError) as refused:
            await verifier.verify(make_token("u", info=bad))
        assert refused.value.reason == "claims"
        assert "info" in str(refused.value)


async def test_a_bad_info_claim_is_refused_like_any_invalid_token(node: Node) -> None:
    token = make_token("u", info={"bio": "é" * 600})  # 1,200 bytes as UTF-8
    status, _, body = await asyncio.to_thread(http_get, f"{http_url(node)}/ws?token={token}",
                               {"Upgrade": "websocket", "Connection": "Upgrade",
                                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                                "Sec-WebSocket-Version": "13"})
    assert status == 401
    assert "info" in body


# -- join / leave --------------------------------------------------------------------


async def test_join_and_leave_reach_the_others_in_order_never_the_member(fleet: Fleet) -> None:
    # --join-leave alone: it needs no --presence.
    one, two = await fleet(join_leave=PRESENCE, presence=PatternSet(()))
    publisher = make_token("pub", publish=[">"])
    async with clients((one, make_token("anna")), (two, make_token("ben")),
                       (two, publisher)) as (anna, ben, backend):
        await anna.subscribe(ROOM)
        await ben.subscribe(ROOM)
        ben_member = {"client": client_id(ben), "user": "ben"}
        assert await _frames(anna, 1) == [("join", ben_member)]
        await backend.request("publish", channel=ROOM, data=1)
        async with clients((one, make_token("cleo", info={"seat": 3}))) as (cleo,):
            cleo_member = {"client": client_id(cleo), "user": "cleo", "info": {"seat": 3}}
            await cleo.subscribe(ROOM)
            await backend.request("publish", channel=ROOM, data=2)
            await cleo.request("unsubscribe", channel=ROOM)
            await backend.request("publish", channel=ROOM, data=3)
            await cleo.subscribe(ROOM)
            await backend.request("publish", channel=ROOM, data=4)
            # cleo sees the messages of her subscriptions, never her own join or leave.
            assert await _frames(cleo, 2) == [("message", 2), ("message", 4)]
            with pytest.raises(TimeoutError):
                await cleo.receive(timeout=0.2)
        await backend.request("publish", channel=ROOM, data=5)  # after cleo disconnected
        expected = [
            ("message", 1), ("join", cleo_member), ("message", 2), ("leave", cleo_member),
            ("message", 3), ("join", cleo_member), ("message", 4), ("leave", cleo_member),
            ("message", 5),
        ]
        assert await _frames(anna, len(expected)) == expected
        assert await _frames(ben, len(expected)) == expected


async def _frames(client: Client, count: int) -> list[tuple[str, Any]]:
    """The next ``count`` message, join and leave frames of ``ROOM``."""
    seen: list[tuple[str, Any]] = []
    while len(seen) < count:
        frame = await client.receive()
        if frame.get("channel") != ROOM:
            continue
        if frame["type"] == "message":
            seen.append(("message", frame["data"]))
        elif frame["type"] in ("join", "leave"):
            seen.append((frame["type"], frame["member"]))
    return seen


async def test_a_join_frame_finds_the_member_listed_and_a_leave_finds_it_gone(
    fleet: Fleet,
) -> None:
    one, two = await fleet(join_leave=PRESENCE)
    async with clients((one, make_token("watcher"))) as (watcher,):
        await watcher.subscribe(ROOM)
        async with clients((two, make_token("bob"))) as (bob,):
            await bob.subscribe(ROOM)
            assert (await watcher.receive())["type"] == "join"
            assert {m["user"] for m in await members_on(watcher)} == {"watcher", "bob"}
        assert (await watcher.receive())["type"] == "leave"
        assert {m["user"] for m in await members_on(watcher)} == {"watcher"}


async def test_a_member_never_receives_its_own_join_or_leave(start_node: NodeFactory) -> None:
    node = await start_node(join_leave=PRESENCE)
    async with clients((node, make_token("solo", publish=[">"]))) as (solo,):
        await solo.subscribe(ROOM)
        await solo.request("unsubscribe", channel=ROOM)
        await solo.subscribe(ROOM)
        await solo.request("publish", channel=ROOM, data="only this")
        frame = await solo.receive()
        assert frame["type"] == "message", frame
        with pytest.raises(TimeoutError):
            await solo.receive(timeout=0.2)


async def test_channels_without_join_leave_send_no_join_frames(start_node: NodeFactory) -> None:
    node = await start_node(presence=PRESENCE)  # presence, but no --join-leave
    async with clients((node, make_token("a")), (node, make_token("b"))) as (a, b):
        await a.subscribe(ROOM)
        await b.subscribe(ROOM)
        with pytest.raises(TimeoutError):
            await a.receive(timeout=0.2)


# -- real processes: SIGKILL and drain -------------------------------------------------


async def test_a_sigkilled_nodes_members_vanish_within_presence_ttl(
    server_process: Callable[..., ServerProcess], redis_server: RedisServer,
    start_node: NodeFactory,
) -> None:
    ttl = 2.0
    doomed = server_process("--jwt-secret", SECRET, "--redis-url", redis_server.url,
                            "--presence", "chat.>", "--presence-ttl", f"{ttl:g}s")
    survivor = await start_node(redis_url=redis_server.url, presence=PRESENCE,
                                presence_ttl=ttl)
    async with contextlib.AsyncExitStack() as stack:
        lost = [await stack.enter_async_context(Client.connect(doomed.url, make_token(f"u{i}")))
                for i in range(5)]
        kept = await stack.enter_async_context(Client.connect(ws_url(survivor), make_token("k")))
        for client in (*lost, kept):
            await client.subscribe(ROOM)
        assert await stats_on(kept) == (6, 6)
        doomed.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        await within(ttl + 2, lambda: _stats_are(kept, (1, 1)))
        assert time.monotonic() - killed_at <= ttl + 0.5
        assert [m["user"] for m in await members_on(kept)] == ["k"]
        # The survivor's own member outlives the TTL: its node refreshes it.
        await asyncio.sleep(ttl)
        assert await stats_on(kept) == (1, 1)


async def test_a_drain_produces_leaves_not_errors(
    server_process: Callable[..., ServerProcess], redis_server: RedisServer,
    start_node: NodeFactory,
) -> None:
    draining = server_process("--jwt-secret", SECRET, "--redis-url", redis_server.url,
                              "--presence", "chat.>", "--join-leave", "chat.>",
                              "--drain-seconds", "1")
    observer_node = await start_node(redis_url=redis_server.url, presence=PRESENCE,
                                     join_leave=PRESENCE)
    async with contextlib.AsyncExitStack() as stack:
        observer = await stack.enter_async_context(
            Client.connect(ws_url(observer_node), make_token("observer")))
        await observer.subscribe(ROOM)
        leaving = [await stack.enter_async_context(
            Client.connect(draining.url, make_token(f"u{i}"))) for i in range(6)]
        for client in leaving:
            await client.subscribe(ROOM)
        ids = {client_id(client) for client in leaving}
        joined = {(await observer.receive())["member"]["client"] for _ in leaving}
        assert joined == ids
        draining.signal(signal.SIGTERM)
        left = []
        for _ in leaving:
            frame = await observer.receive(timeout=10)
            assert frame["type"] == "leave", frame
            left.append(frame["member"]["client"])
        assert set(left) == ids
        for client in leaving:
            assert (await client.closed(timeout=10))[0] == 1012
        assert await stats_on(observer) == (1, 1)
    assert await asyncio.to_thread(draining.wait, 10) == 0
    assert "Traceback" not in draining.stderr
    assert " ERROR " not in draining.stderr and " WARNING " not in draining.stderr, (
        draining.stderr)


# -- Redis: outages -----------------------------------------------------------------------


async def test_presence_is_unavailable_while_redis_is_down_and_heals_after(
    redis_server: RedisServer, start_node: NodeFactory,
) -> None:
    node = await start_node(redis_url=redis_server.url, presence=PRESENCE, presence_ttl=3.0)
    async with clients((node, make_token("alice"))) as (alice,):
        await alice.subscribe(ROOM)
        redis_server.kill()
        await eventually(lambda: not node.backplane.is_up)
        for op in ("presence", "presence_stats"):
            reply = await alice.request(op, channel=ROOM)
            assert (reply["type"], reply["code"]) == ("error", "unavailable")
        redis_server.start()  # empty: the member is lost with the old Redis
        await eventually(lambda: node.backplane.is_up, timeout=15)
        # The node's refresh (every TTL/3 = 1 s) puts its member back.
        await within(3, lambda: _stats_are(alice, (1, 1)))


# -- configuration ---------------------------------------------------------------------


def test_presence_flags_and_their_defaults() -> None:
    settings = load_settings({"presence": ["chat.>,room.*"], "join_leave": ["chat.>"]},
                             environ={"WSB_PRESENCE_TTL": "2m", "WSB_JWT_SECRET": SECRET})
    assert settings.presence.matches("chat.x") and settings.presence.matches("room.1")
    assert settings.join_leave.matches("chat.x") and not settings.join_leave.matches("room.1")
    assert settings.presence_ttl == 120
    assert load_settings({}, environ={}).presence_ttl == 60
    with pytest.raises(ConfigError, match="presence-ttl"):
        load_settings({"presence_ttl": "0.5"}, environ={})
    with pytest.raises(ConfigError, match="--presence"):
        load_settings({"presence": ["a..b"]}, environ={})


# -- refresh spread ------------------------------------------------------------------------


class RecordingStore(MemoryPresenceStore):
    """The in-process store, noting the size of every refresh the node makes."""

    def __init__(self) -> None:
        super().__init__()
        self.refreshes: list[tuple[float, int]] = []
        self.refreshed: set[str] = set()

    async def refresh(self, held: Mapping[str, Sequence[Member]]) -> list[tuple[str, Member]]:
        members = [member for chunk in held.values() for member in chunk]
        self.refreshes.append((time.monotonic(), len(members)))
        self.refreshed.update(member.client for member in members)
        return await super().refresh(held)


async def test_refreshes_are_spread_over_the_period_not_one_burst() -> None:
    ttl = 1.5  # a refresh period of 0.5 s in 20 ticks of 25 ms
    settings = Settings(presence=PRESENCE, presence_ttl=ttl)
    backplane = MemoryBackplane()
    store = RecordingStore()
    presence = PresenceService(settings, backplane, Metrics(), store)
    await backplane.start()
    await presence.start()
    try:
        members = [Member.of(f"client-{i}", f"user-{i}") for i in range(4000)]
        for member in members:
            await presence.join(f"chat.{hash(member.client) % 50}", member)
        store.refreshes.clear()
        store.refreshed.clear()
        everyone = {member.client for member in members}
        await eventually(lambda: store.refreshed == everyone)  # every slice came round
        sizes = [size for _, size in store.refreshes if size]
        # 20 slices: each tick carries about 1/20 of the members, never a burst of all.
        assert len(sizes) >= 20
        assert max(sizes) < len(members) / 8, sizes
    finally:
        await presence.stop()
        await backplane.stop()


# -- the wire: event envelopes ---------------------------------------------------------------


def test_member_events_travel_as_wsb1_envelopes() -> None:
    member = Member.of("c1", "alice", {"n": 1})
    payload = protocol.encode_member_event("join", member.json)
    assert payload == b'wsb1{"event":"join","member":{"client":"c1","user":"alice","info":{"n":1}}}'
    envelope = protocol.decode_payload(payload)
    assert envelope.event == protocol.MemberEvent("join", member.json, "c1")
    assert orjson.loads(protocol.encode_member_frame("join", ROOM, member.json)) == {
        "type": "join", "channel": ROOM, "member": {"client": "c1", "user": "alice",
                                                    "info": {"n": 1}}}
    for bad in (b'wsb1{"event":"wave","member":{"client":"c"}}',
                b'wsb1{"event":"join","member":"c"}',
                b'wsb1{"event":"leave","member":{"user":"u"}}'):
        with pytest.raises(ValueError):
            protocol.decode_payload(bad)


async def test_a_malformed_event_from_a_backend_is_dropped_and_counted(
    start_node: NodeFactory, redis_server: RedisServer,
) -> None:
    node = await start_node(redis_url=redis_server.url, join_leave=PRESENCE)
    async with clients((node, make_token("a"))) as (a,):
        await a.subscribe(ROOM)
        with redis_server.client() as backend:
            backend.publish("ws:" + ROOM, b'wsb1{"event":"join","member":42}')
            backend.publish("ws:" + ROOM, b'wsb1{"event":"leave","member":{"client":"x"}}')
        frame = await a.receive()
        assert frame == {"type": "leave", "channel": ROOM, "member": {"client": "x"}}
        assert await _metric(node, 'wsbroker_messages_dropped_total{reason="invalid_payload"}') == 1
