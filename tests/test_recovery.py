"""A history channel's sequence on one node, driven through the hub on the in-process engine.

No sockets: the subscribers record the frames the hub gives them, and the
engine is the real in-process one, whose history is written around the
hub where a test needs a message the node never saw (a gap).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from wsbroker.backplane.memory import MemoryBackplane
from wsbroker.history import HistoryRule, HistoryRules, Position
from wsbroker.hub import Hub, Outgoing
from wsbroker.metrics import Metrics
from wsbroker.protocol import Since, encode_envelope
from wsbroker.recovery import INSUFFICIENT_STATE

RULE = HistoryRule("h.>", 100)


class Recorder:
    """A subscriber that keeps what it was given."""

    def __init__(self) -> None:
        self.frames: list[dict[str, object]] = []
        self.dropped: list[tuple[str, str]] = []
        self.changed = asyncio.Event()

    def deliver(self, message: Outgoing) -> bool:
        self.frames.append(orjson.loads(message.payload))
        self.changed.set()
        return True

    def unsubscribed(self, channel: str, reason: str) -> None:
        self.dropped.append((channel, reason))
        self.changed.set()

    def offsets(self) -> list[object]:
        return [frame.get("offset") for frame in self.frames]

    async def until(self, count: int) -> list[object]:
        async with asyncio.timeout(5):
            while len(self.frames) < count:
                self.changed.clear()
                await self.changed.wait()
        return self.offsets()


@pytest.fixture
def engine() -> MemoryBackplane:
    return MemoryBackplane()


@pytest.fixture
async def hub(engine: MemoryBackplane) -> AsyncIterator[Hub]:
    hub = Hub(engine, Metrics(), HistoryRules.parse(["h.>=100"]))
    engine.bind(hub.on_message, lambda up: None, hub.resync)
    await engine.start()
    yield hub
    await hub.close()
    await engine.stop()


async def test_a_gap_is_filled_from_the_stream_before_newer_messages(
        hub: Hub, engine: MemoryBackplane) -> None:
    subscriber = Recorder()
    await hub.subscribe("h.a", subscriber)
    await hub.publish("h.a", b"1")
    engine.history.publish("h.a", b"2", None, RULE)  # recorded, never delivered
    engine.history.publish("h.a", b"3", None, RULE)
    await hub.publish("h.a", b"4")
    assert await subscriber.until(4) == [1, 2, 3, 4]
    assert [frame["data"] for frame in subscriber.frames] == [1, 2, 3, 4]


async def test_a_repeated_offset_is_dropped(hub: Hub) -> None:
    subscriber = Recorder()
    await hub.subscribe("h.d", subscriber)
    published = await hub.publish("h.d", b"1")
    repeat = encode_envelope(b"1", None, published.offset, published.epoch)
    hub.on_message("h.d", repeat)
    await hub.publish("h.d", b"2")
    assert await subscriber.until(2) == [1, 2]  # offset 1 once, whichever copy came first


async def test_resync_reads_what_was_published_meanwhile(hub: Hub, engine: MemoryBackplane) -> None:
    subscriber = Recorder()
    await hub.subscribe("h.r", subscriber)
    for value in (b"1", b"2"):
        engine.history.publish("h.r", value, None, RULE)
    hub.resync(["h.r"])
    assert await subscriber.until(2) == [1, 2]


async def test_a_lost_history_drops_its_subscribers_with_insufficient_state(
        hub: Hub, engine: MemoryBackplane) -> None:
    subscriber = Recorder()
    position = await hub.subscribe("h.l", subscriber)
    assert position is not None and position.offset == 0
    await hub.publish("h.l", b"1")
    await subscriber.until(1)
    engine.history.clear()  # as Redis restarted without persistence
    hub.resync(["h.l"])
    async with asyncio.timeout(5):
        while not subscriber.dropped:
            subscriber.changed.clear()
            await subscriber.changed.wait()
    assert subscriber.dropped == [("h.l", INSUFFICIENT_STATE)]
    assert hub.subscription_count == 0


async def test_since_replays_then_hands_over_to_live_without_a_duplicate(hub: Hub) -> None:
    for value in range(1, 6):
        await hub.publish("h.s", b"%d" % value)
    first = Recorder()
    positions: list[Position | None] = []
    await hub.subscribe("h.s", first, confirm=positions.append)
    epoch = positions[0].epoch if positions[0] else ""
    late = Recorder()

    def confirmed(position: Position | None) -> None:
        positions.append(position)
        assert late.frames == []  # the ok comes before the replay

    joining = asyncio.create_task(hub.subscribe("h.s", late, Since(2, epoch), confirmed))
    await hub.publish("h.s", b"6")  # published while the replay is read
    await joining
    await hub.publish("h.s", b"7")
    assert await late.until(5) == [3, 4, 5, 6, 7]
    assert positions[-1] is not None and positions[-1].recovered is True
