"""One behavioural suite for every backplane engine (memory, Redis, Redis Cluster).

The engines are driven directly, without WebSockets: what the hub relies on
(base.py) must hold for both. Redis-only behaviour (several nodes, Redis
subscriptions, outages) runs against a real ``redis-server`` process that is
SIGKILLed and restarted where the test needs it; the cluster engine runs the
shared tests against a real three-master cluster (its own failure paths are in
tests/test_cluster.py). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
import redis.asyncio as aioredis

from tests.redis_cluster import LocalCluster
from tests.redis_server import RedisServer, numsub, redis_cli
from wsbroker.backplane import Backplane, BackplaneUnavailable
from wsbroker.backplane.cluster import ClusterBackplane
from wsbroker.backplane.memory import MemoryBackplane
from wsbroker.backplane.redis import RedisBackplane, backoff_delay, redact_url
from wsbroker.config import Settings
from wsbroker.history import HistoryRule
from wsbroker.protocol import Envelope, decode_payload

pytestmark = pytest.mark.filterwarnings("error")  # no unclosed sockets, no stray warnings

WAIT = 5.0
PREFIX = "t:"


class Recorder:
    """Collects what an engine hands to the hub; lets a test await a condition."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.states: list[bool] = []
        self._changed = asyncio.Event()

    def on_message(self, channel: str, payload: bytes) -> None:
        self.messages.append((channel, payload))
        self._changed.set()

    def on_state(self, up: bool) -> None:
        self.states.append(up)
        self._changed.set()

    def payloads(self, channel: str) -> list[bytes]:
        return [payload for name, payload in self.messages if name == channel]

    async def until(self, condition: Callable[[], bool], within: float = WAIT) -> None:
        """Return once ``condition()`` holds after a callback; fail after ``within`` s."""
        async with asyncio.timeout(within):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    async def received(self, channel: str, count: int, within: float = WAIT) -> list[bytes]:
        await self.until(lambda: len(self.payloads(channel)) >= count, within)
        return self.payloads(channel)


@dataclass
class Node:
    """One engine under test, with its receivers (and its Redis, for the Redis engine)."""

    kind: str
    engine: Backplane
    rec: Recorder
    server: RedisServer | None = None
    others: list[Backplane] = field(default_factory=list)

    def require_redis(self) -> RedisServer:
        if self.kind == "cluster":
            pytest.skip("single-Redis behaviour; the cluster engine's is in test_cluster.py")
        if self.server is None:
            pytest.skip("the in-process engine is one node with no Redis, by design")
        return self.server

    async def peer(self) -> tuple[RedisBackplane, Recorder]:
        """A second node on the same Redis."""
        engine, rec = await start_redis_engine(self.require_redis(), node_id="peer")
        self.others.append(engine)
        return engine, rec


async def start_redis_engine(server: RedisServer, node_id: str = "test",
                             ping: tuple[float, float] | None = None) -> tuple[
        RedisBackplane, Recorder]:
    engine = RedisBackplane(Settings(redis_url=server.url, redis_prefix=PREFIX, node_id=node_id))
    if ping is not None:
        engine.ping_interval, engine.ping_timeout = ping
    rec = Recorder()
    engine.bind(rec.on_message, rec.on_state)
    await engine.start()
    return engine, rec


def is_up(engine: Backplane) -> bool:
    """``engine.is_up`` read afresh (a plain attribute read would be narrowed by mypy)."""
    return engine.is_up


@pytest.fixture(params=["memory", "redis", "cluster"])
async def node(request: pytest.FixtureRequest) -> AsyncIterator[Node]:
    if request.param == "memory":
        rec = Recorder()
        memory = MemoryBackplane()
        memory.bind(rec.on_message, rec.on_state)
        await memory.start()
        this = Node("memory", memory, rec)
    elif request.param == "cluster":
        cluster: LocalCluster = request.getfixturevalue("redis_cluster_module")
        engine_c = ClusterBackplane(Settings(redis_url=cluster.url, redis_cluster=True,
                                             redis_prefix=PREFIX, node_id="test"))
        rec = Recorder()
        engine_c.bind(rec.on_message, rec.on_state)
        await engine_c.start()
        this = Node("cluster", engine_c, rec)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        engine, rec = await start_redis_engine(server)
        this = Node("redis", engine, rec, server)
    try:
        assert this.engine.is_up
        assert this.rec.states == [True]
        yield this
    finally:
        for other in this.others:
            await other.stop()
        await this.engine.stop()
        assert not this.engine.is_up


# -- both engines --------------------------------------------------------------


async def test_subscribe_then_publish_is_received(node: Node) -> None:
    await node.engine.subscribe("prices.AAPL")
    await node.engine.publish("prices.AAPL", b'{"p":1}')
    assert await node.rec.received("prices.AAPL", 1) == [b'{"p":1}']


async def test_payload_bytes_are_preserved_exactly(node: Node) -> None:
    payloads = [
        b"",
        b"0",
        b'{"a":"\xc3\xa9\xe2\x82\xac"}',
        b'wsb1{"data":[1,2],"from":"u"}',
        bytes(range(256)),
        b"\r\n*3\r\n$7\r\nmessage\r\n",  # RESP lookalike
        os.urandom(256 * 1024),
    ]
    await node.engine.subscribe("bin")
    for payload in payloads:
        await node.engine.publish("bin", payload)
    assert await node.rec.received("bin", len(payloads)) == payloads


async def test_order_of_back_to_back_publishes_is_kept(node: Node) -> None:
    await node.engine.subscribe("seq.a")
    await node.engine.subscribe("seq.b")
    sent = [str(i).encode() for i in range(2000)]
    for payload in sent:
        await node.engine.publish("seq.a" if int(payload) % 3 else "seq.b", payload)
    await node.rec.until(lambda: len(node.rec.messages) >= len(sent))
    assert node.rec.payloads("seq.a") == [p for p in sent if int(p) % 3]
    assert node.rec.payloads("seq.b") == [p for p in sent if not int(p) % 3]
    assert len(node.rec.messages) == len(sent)  # none duplicated


async def test_unsubscribe_stops_delivery(node: Node) -> None:
    await node.engine.subscribe("a")
    await node.engine.subscribe("b")
    await node.engine.publish("a", b"before")
    await node.rec.received("a", 1)
    await node.engine.unsubscribe("a")
    await node.engine.publish("a", b"after")
    await node.engine.publish("b", b"marker")  # published later, on the same path
    await node.rec.received("b", 1)
    assert node.rec.payloads("a") == [b"before"]


async def test_unsubscribe_of_unknown_channel_is_harmless(node: Node) -> None:
    await node.engine.unsubscribe("never.subscribed")
    await node.engine.subscribe("x")
    await node.engine.publish("x", b"1")
    assert await node.rec.received("x", 1) == [b"1"]


async def test_subscribe_unsubscribe_subscribe_race_ends_subscribed(node: Node) -> None:
    channels = [f"race.{i}" for i in range(20)]
    await asyncio.gather(*(
        step
        for channel in channels
        for step in (node.engine.subscribe(channel), node.engine.unsubscribe(channel),
                     node.engine.subscribe(channel))
    ))
    for channel in channels:
        await node.engine.publish(channel, channel.encode())
    await node.rec.until(lambda: len(node.rec.messages) >= len(channels))
    assert sorted(node.rec.messages) == sorted((c, c.encode()) for c in channels)
    if node.server is not None:
        assert numsub(node.server, *(PREFIX + c for c in channels)) == {
            PREFIX + c: 1 for c in channels}


async def test_subscribe_unsubscribe_race_ends_unsubscribed(node: Node) -> None:
    await asyncio.gather(node.engine.subscribe("gone"), node.engine.unsubscribe("gone"))
    await node.engine.subscribe("marker")
    await node.engine.publish("gone", b"x")
    await node.engine.publish("marker", b"m")
    await node.rec.received("marker", 1)
    assert node.rec.payloads("gone") == []
    if node.server is not None:
        assert numsub(node.server, PREFIX + "gone") == {PREFIX + "gone": 0}


async def test_burst_of_10000_publishes_is_all_received(node: Node) -> None:
    await node.engine.subscribe("burst")
    count = 10_000
    for i in range(count):
        await node.engine.publish("burst", b"%d" % i)
    got = await node.rec.received("burst", count, within=20)
    assert got == [b"%d" % i for i in range(count)]


async def test_down_engine_refuses_subscribe_and_publish(node: Node) -> None:
    await node.engine.subscribe("a")
    await node.engine.stop()
    assert not node.engine.is_up
    with pytest.raises(BackplaneUnavailable):
        await node.engine.subscribe("b")
    with pytest.raises(BackplaneUnavailable):
        await node.engine.publish("a", b"x")
    await node.engine.unsubscribe("a")


# -- history (SPEC §7): every engine -------------------------------------------------

RULE = HistoryRule("h.>", 5)


def offsets_of(payloads: list[bytes]) -> list[int | None]:
    return [decode_payload(payload).offset for payload in payloads]


async def test_history_publish_numbers_and_delivers_atomically(node: Node) -> None:
    await node.engine.subscribe("h.a")
    first = await node.engine.publish_history("h.a", b'{"n":1}', "alice", RULE)
    second = await node.engine.publish_history("h.a", b"2", None, RULE)
    assert (first.offset, second.offset) == (1, 2)
    assert first.epoch and first.epoch == second.epoch
    got = await node.rec.received("h.a", 2)
    assert [decode_payload(p) for p in got] == [
        Envelope(b'{"n":1}', "alice", 1, first.epoch), Envelope(b"2", None, 2, first.epoch)]


async def test_history_read_since_and_newest(node: Node) -> None:
    empty = await node.engine.read_since("h.b", 0, 10, RULE)
    assert (empty.offset, empty.entries) == (0, [])
    for index in range(1, 8):
        await node.engine.publish_history("h.b", b"%d" % index, None, RULE)
    since = await node.engine.read_since("h.b", 4, 10, RULE)
    assert (since.offset, since.epoch) == (7, empty.epoch)
    assert [offset for offset, _ in since.entries] == [5, 6, 7]
    assert offsets_of([payload for _, payload in since.entries]) == [5, 6, 7]
    trimmed = await node.engine.read_since("h.b", 0, 10, RULE)
    assert [offset for offset, _ in trimmed.entries] == [3, 4, 5, 6, 7]  # SIZE 5
    paged = await node.engine.read_since("h.b", 3, 2, RULE)
    assert [offset for offset, _ in paged.entries] == [4, 5]
    newest = await node.engine.read_newest("h.b", 2, RULE)
    assert [offset for offset, _ in newest.entries] == [6, 7]
    assert [decode_payload(p).data for _, p in newest.entries] == [b"6", b"7"]


async def test_history_channels_are_independent(node: Node) -> None:
    one = await node.engine.publish_history("h.one", b"1", None, RULE)
    two = await node.engine.publish_history("h.two", b"1", None, RULE)
    assert one.offset == two.offset == 1
    assert one.epoch != two.epoch


async def test_down_engine_refuses_history(node: Node) -> None:
    await node.engine.stop()
    with pytest.raises(BackplaneUnavailable):
        await node.engine.publish_history("h.x", b"1", None, RULE)
    with pytest.raises(BackplaneUnavailable):
        await node.engine.read_since("h.x", 0, 10, RULE)


# -- Redis: several nodes, real subscriptions, outages ----------------------------


async def test_two_nodes_see_each_others_publishes(node: Node) -> None:
    server = node.require_redis()
    other, other_rec = await node.peer()
    await node.engine.subscribe("room")
    await other.subscribe("room")
    await node.engine.publish("room", b"from-a")
    await other.publish("room", b"from-b")
    assert await node.rec.received("room", 2) == [b"from-a", b"from-b"]
    assert await other_rec.received("room", 2) == [b"from-a", b"from-b"]
    assert numsub(server, PREFIX + "room") == {PREFIX + "room": 2}


async def test_one_redis_subscription_per_channel_confirmed_on_return(node: Node) -> None:
    server = node.require_redis()
    backend = aioredis.Redis.from_url(server.url)
    try:
        for i in range(30):
            channel = f"conf.{i}"
            await node.engine.subscribe(channel)
            # Confirmed means Redis already holds it: a PUBLISH right now counts 1.
            assert await backend.publish(PREFIX + channel, b"now") == 1
        await node.rec.until(lambda: len(node.rec.messages) == 30)
    finally:
        await backend.aclose()
    names = [PREFIX + f"conf.{i}" for i in range(30)]
    assert numsub(server, *names) == dict.fromkeys(names, 1)
    assert numsub(server, "conf.0") == {"conf.0": 0}  # the prefix is always applied
    for i in range(30):
        await node.engine.unsubscribe(f"conf.{i}")
    assert numsub(server, *names) == dict.fromkeys(names, 0)
    clients = redis_cli(server, "CLIENT", "LIST").decode()
    assert "name=wsbroker:test:sub" in clients


async def test_backend_raw_publish_burst_is_drained(node: Node) -> None:
    server = node.require_redis()
    await node.engine.subscribe("feed")
    backend = aioredis.Redis.from_url(server.url)
    try:
        async with backend.pipeline(transaction=False) as pipe:
            for i in range(10_000):
                pipe.publish(PREFIX + "feed", b"%d" % i)
            await pipe.execute()
    finally:
        await backend.aclose()
    got = await node.rec.received("feed", 10_000, within=20)
    assert got == [b"%d" % i for i in range(10_000)]


async def test_redis_killed_and_restarted(node: Node) -> None:
    server = node.require_redis()
    engine, rec = node.engine, node.rec
    await engine.subscribe("keep")
    await engine.subscribe("drop")

    server.kill()
    await rec.until(lambda: rec.states == [True, False])
    assert not is_up(engine)
    started = time.monotonic()
    with pytest.raises(BackplaneUnavailable):
        await asyncio.wait_for(engine.subscribe("new"), 1)
    with pytest.raises(BackplaneUnavailable):
        await asyncio.wait_for(engine.publish("keep", b"lost"), 1)
    await asyncio.wait_for(engine.unsubscribe("drop"), 1)
    assert time.monotonic() - started < 1

    server.start()  # same port
    await rec.until(lambda: rec.states == [True, False, True], within=15)
    assert is_up(engine)
    # Earlier subscriptions deliver again with no action; the dropped one is gone.
    await engine.publish("keep", b"back")
    await engine.publish("drop", b"no")
    backend = aioredis.Redis.from_url(server.url)
    try:
        await backend.publish(PREFIX + "keep", b"raw")
    finally:
        await backend.aclose()
    assert await rec.received("keep", 2) == [b"back", b"raw"]
    assert rec.payloads("drop") == []
    assert numsub(server, PREFIX + "keep", PREFIX + "drop", PREFIX + "new") == {
        PREFIX + "keep": 1, PREFIX + "drop": 0, PREFIX + "new": 0}
    await engine.subscribe("new")
    await engine.publish("new", b"fresh")
    assert await rec.received("new", 1) == [b"fresh"]


async def test_subscribe_pending_when_redis_dies_fails_and_is_forgotten(node: Node) -> None:
    server = node.require_redis()
    engine, rec = node.engine, node.rec
    await engine.subscribe("kept")
    redis_cli(server, "CLIENT", "PAUSE", "10000", "ALL")  # hold the confirmation back
    pending = asyncio.create_task(engine.subscribe("pending"))
    await asyncio.sleep(0)  # SUBSCRIBE is written; the call awaits its confirmation
    assert not pending.done()
    server.kill()
    with pytest.raises(BackplaneUnavailable):
        await asyncio.wait_for(pending, WAIT)
    server.start()
    await rec.until(lambda: rec.states == [True, False, True], within=15)
    # The failed call's channel is not re-subscribed: the hub never counted it.
    assert numsub(server, PREFIX + "kept", PREFIX + "pending") == {
        PREFIX + "kept": 1, PREFIX + "pending": 0}


async def test_silent_redis_is_detected_by_ping(node: Node) -> None:
    server = node.require_redis()
    engine, rec = await start_redis_engine(server, node_id="pinged", ping=(0.2, 0.3))
    node.others.append(engine)
    await engine.subscribe("quiet")
    # Redis stops answering but keeps the socket open, like a partitioned host.
    redis_cli(server, "CLIENT", "PAUSE", "1500", "ALL")
    await rec.until(lambda: rec.states == [True, False], within=3)
    await rec.until(lambda: rec.states == [True, False, True], within=10)
    await engine.publish("quiet", b"again")
    assert await rec.received("quiet", 1) == [b"again"]


async def test_cancelled_subscribe_leaves_no_redis_subscription(node: Node) -> None:
    server = node.require_redis()
    task = asyncio.create_task(node.engine.subscribe("abandoned"))
    await asyncio.sleep(0)  # let it send SUBSCRIBE; it now awaits the confirmation
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The engine unsubscribes what Redis confirmed but nobody wants. Commands on
    # the subscriber connection are processed in order, so once a later
    # subscribe + unsubscribe round trip is confirmed, that UNSUBSCRIBE is done.
    await node.engine.subscribe("after")
    await node.engine.unsubscribe("after")
    assert numsub(server, PREFIX + "abandoned", PREFIX + "after") == {
        PREFIX + "abandoned": 0, PREFIX + "after": 0}
    await node.engine.subscribe("after")
    await node.engine.publish("abandoned", b"x")
    await node.engine.publish("after", b"y")
    assert await node.rec.received("after", 1) == [b"y"]
    assert node.rec.payloads("abandoned") == []


async def test_stop_while_reconnecting_is_prompt(node: Node) -> None:
    server = node.require_redis()
    await node.engine.subscribe("a")
    server.kill()
    await node.rec.until(lambda: node.rec.states == [True, False])
    await asyncio.wait_for(node.engine.stop(), 2)
    assert node.rec.states == [True, False]


async def test_start_while_redis_is_down_returns_and_retries() -> None:
    server = RedisServer()  # not started yet: its port refuses connections
    engine = RedisBackplane(Settings(redis_url=server.url, redis_prefix=PREFIX))
    rec = Recorder()
    engine.bind(rec.on_message, rec.on_state)
    try:
        await asyncio.wait_for(engine.start(), 5)
        assert not engine.is_up
        with pytest.raises(BackplaneUnavailable):
            await engine.subscribe("x")
        server.start()
        await rec.until(lambda: rec.states == [True], within=10)
        await engine.subscribe("x")
        await engine.publish("x", b"1")
        assert await rec.received("x", 1) == [b"1"]
    finally:
        await engine.stop()
        server.close()


# -- small pure functions ----------------------------------------------------------


def test_backoff_doubles_from_100ms_to_a_5s_cap_with_jitter() -> None:
    import random

    class Fixed(random.Random):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.value = value

        def random(self) -> float:
            return self.value

    low, high = Fixed(0.0), Fixed(0.999999)
    assert backoff_delay(0, low) == pytest.approx(0.05)
    assert backoff_delay(0, high) == pytest.approx(0.1)
    assert backoff_delay(1, high) == pytest.approx(0.2)
    assert backoff_delay(5, high) == pytest.approx(3.2)
    assert backoff_delay(6, high) == pytest.approx(5.0)
    assert backoff_delay(1000, low) == pytest.approx(2.5)
    assert len({backoff_delay(3) for _ in range(20)}) > 1


def test_cluster_mode_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="redis-cluster"):
        RedisBackplane(Settings(redis_url="redis://127.0.0.1:1", redis_cluster=True))


def test_redact_url_hides_the_password() -> None:
    assert redact_url("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("redis://u:s3cret@h/0") == "redis://u:***@h/0"
    assert redact_url("redis://h:6379") == "redis://h:6379"
