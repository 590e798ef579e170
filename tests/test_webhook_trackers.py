"""The occupancy tracker's promises, on every engine (memory, Redis, Redis Cluster):
one start per fleet-wide 0→1, one end after the delay, neither when re-held in time.

Trackers are driven directly (no sockets): each stands for one node.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.conftest import node_settings
from tests.helpers import eventually
from wsbroker.webhooks.tracking import MemoryTracker, RedisTracker, Subject, Tracker

DELAY = 0.3
ROOM = Subject("room.1")
ALICE = Subject("room.1", "alice")

Events = list[tuple[str, Subject]]
Start = Callable[..., Tracker]


@pytest.fixture(params=["memory", "redis", "cluster"])
async def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def fleet(
    engine: str, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[Start, Events]]:
    """Start trackers ("nodes") that all report into one event list."""
    events: Events = []
    trackers: list[Tracker] = []
    url = None
    if engine == "redis":
        url = request.getfixturevalue("redis_server").url
    elif engine == "cluster":
        url = request.getfixturevalue("redis_cluster_module").url

    def on_start(subject: Subject, when: int) -> None:
        events.append(("start", subject))

    def on_end(subject: Subject, when: int) -> None:
        events.append(("end", subject))

    def start(**overrides: Any) -> Tracker:
        tracker: Tracker
        if url is None:
            if trackers:
                pytest.skip("the in-process tracker is one node, by design")
            tracker = MemoryTracker(DELAY, on_start, on_end)
        else:
            settings = dataclasses.replace(
                node_settings(redis_url=url, redis_cluster=engine == "cluster",
                              webhook_vacate_delay=DELAY, node_id=f"n{len(trackers)}",
                              redis_prefix=f"t{id(events)}:"),
                **overrides)
            tracker = RedisTracker(settings, on_start, on_end)
        trackers.append(tracker)
        return tracker

    yield start, events
    for tracker in trackers:
        await tracker.close()


async def started(*trackers: Tracker) -> None:
    for tracker in trackers:
        await tracker.start()


def settled(*trackers: Tracker) -> Callable[[], bool]:
    return lambda: all(tracker.settled for tracker in trackers)


async def test_one_start_however_many_nodes_hold(fleet: tuple[Start, Events]) -> None:
    start, events = fleet
    first = start()
    await started(first)
    first.hold(ROOM)
    first.hold(ALICE)
    await eventually(settled(first))
    assert events == [("start", ROOM), ("start", ALICE)]
    others = [start(), start()]
    await started(*others)
    for tracker in others:
        tracker.hold(ROOM)
    await eventually(settled(first, *others))
    assert events == [("start", ROOM), ("start", ALICE)]


async def test_one_end_after_the_delay_once_the_last_node_releases(
    fleet: tuple[Start, Events],
) -> None:
    start, events = fleet
    first = start()
    await started(first)
    first.hold(ROOM)
    await eventually(settled(first))
    first.release(ROOM)
    loop = asyncio.get_running_loop()
    released = loop.time()
    await eventually(lambda: len(events) == 2)
    assert loop.time() - released >= DELAY * 0.95
    await eventually(settled(first))
    assert events == [("start", ROOM), ("end", ROOM)]


async def test_held_again_within_the_delay_gives_neither(
    fleet: tuple[Start, Events],
) -> None:
    start, events = fleet
    first = start()
    await started(first)
    first.hold(ROOM)
    first.release(ROOM)
    await asyncio.sleep(DELAY / 3)
    first.hold(ROOM)
    await asyncio.sleep(DELAY * 1.5)  # the first vacancy would have ended by now
    await eventually(settled(first))
    assert events == [("start", ROOM)]


async def test_concurrent_holds_on_many_nodes_start_once(
    fleet: tuple[Start, Events],
) -> None:
    start, events = fleet
    trackers = [start(), start(), start(), start()]
    await started(*trackers)
    for round_ in range(20):
        subject = Subject(f"room.{round_}")
        for tracker in trackers:
            tracker.hold(subject)
        for tracker in trackers:
            tracker.release(subject)
    await eventually(lambda: len(events) == 40, timeout=10)
    await eventually(settled(*trackers))
    for round_ in range(20):
        subject = Subject(f"room.{round_}")
        assert [kind for kind, seen in events if seen == subject] == ["start", "end"]


async def test_a_node_that_stops_refreshing_expires(
    fleet: tuple[Start, Events], engine: str
) -> None:
    if engine == "memory":
        pytest.skip("the in-process tracker has no other node to expire")
    start, events = fleet
    doomed, survivor = start(presence_ttl=0.5), start(presence_ttl=0.5)
    await started(doomed, survivor)
    doomed.hold(ROOM)
    await eventually(settled(doomed))
    for task in doomed._tasks:  # dies: no refresh, no release, no goodbye
        task.cancel()
    doomed._tasks = []
    await eventually(lambda: len(events) == 2, timeout=5)
    assert events == [("start", ROOM), ("end", ROOM)]
