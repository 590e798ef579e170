"""Recovery in wsbroker.js (SPEC §7, §14): with ``recover: true`` the application
sees every offset once, in order, across reconnects.

A scripted server plays the edge cases the client must get right whatever the
timing (overlap between recovered and live messages, a lost epoch); real
history nodes show the whole path.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from websockets.asyncio.server import ServerConnection, serve

import wsbroker
from tests.browser_client_harness import Tab, needs_chromium
from tests.conftest import http_url
from tests.helpers import SECRET, ServerProcess, eventually, free_port, make_token
from tests.redis_server import RedisServer
from wsbroker.server import Node

pytestmark = needs_chromium

OpenTab = Callable[..., Any]
CHANNEL = "chat.room1"
HISTORY = "chat.>=1000"


class HistoryScript:
    """Three connections, each closed with 1012 after its part of the script."""

    def __init__(self) -> None:
        self.port = free_port()
        self.subscribes: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def handler(self, connection: ServerConnection) -> None:
        await connection.recv()  # auth
        await self.send(connection, type="welcome", client="c", user="alice", node="scripted",
                        expires=time.time() + 3600)
        subscribe = orjson.loads(await connection.recv())
        self.subscribes.append(subscribe)
        reply = {"type": "ok", "id": subscribe["id"], "channel": CHANNEL}
        part = len(self.subscribes)
        if part == 1:  # a first subscribe: the latest offset, then live messages
            await self.send(connection, **reply, offset=0, epoch="E1")
            await self.messages(connection, 1, 2, 3)
        elif part == 2:  # recovered: 4 and 5 retained; live 5 again and 6 overlap
            await self.send(connection, **reply, offset=5, epoch="E1", recovered=True)
            await self.messages(connection, 3, 4, 5, 5, 6)
        else:  # the stream was lost: a new epoch, offsets restart
            await self.send(connection, **reply, offset=10, epoch="E2", recovered=False)
            await self.messages(connection, 11)
            await connection.wait_closed()
            return
        await connection.close(1012, "service restart")

    @staticmethod
    async def send(connection: ServerConnection, **frame: Any) -> None:
        await connection.send(orjson.dumps(frame).decode())

    async def messages(self, connection: ServerConnection, *offsets: int) -> None:
        for offset in offsets:
            await self.send(connection, type="message", channel=CHANNEL, data={"n": offset},
                            offset=offset)


@pytest.fixture
async def script() -> AsyncIterator[HistoryScript]:
    server = HistoryScript()
    async with serve(server.handler, "127.0.0.1", server.port):
        yield server


async def test_recovery_delivers_each_offset_once_in_order(
    node: Node, open_tab: OpenTab, script: HistoryScript
) -> None:
    tab: Tab = await open_tab()
    await tab.start(http_url(node) + "/wsbroker.js", script.url, token=make_token(),
                    minReconnectDelay=50)
    await tab.js(f"track('{CHANNEL}', {{ recover: true }})")
    await tab.until("events.filter(e => e.kind === 'subscribed').length === 3")
    await tab.until("events.some(e => e.kind === 'message' && e.offset === 11)")
    offsets = [m["offset"] for m in await tab.events("message")]
    assert offsets == [1, 2, 3, 4, 5, 6, 11]
    subscribed = [(e["recovered"], e["offset"], e["epoch"]) for e in await tab.events("subscribed")]
    assert subscribed == [(False, 0, "E1"), (True, 5, "E1"), (False, 10, "E2")]
    assert [s.get("since") for s in script.subscribes] == [
        None, {"offset": 3, "epoch": "E1"}, {"offset": 6, "epoch": "E1"}]
    assert await tab.js(f"[client.subscribe('{CHANNEL}').offset, "
                        f"client.subscribe('{CHANNEL}').epoch]") == [11, "E2"]


async def test_without_recover_a_reconnect_subscribes_afresh(
    node: Node, open_tab: OpenTab, script: HistoryScript
) -> None:
    tab: Tab = await open_tab()
    await tab.start(http_url(node) + "/wsbroker.js", script.url, token=make_token(),
                    minReconnectDelay=50)
    await tab.js(f"track('{CHANNEL}')")
    await tab.until("events.filter(e => e.kind === 'subscribed').length >= 2")
    assert "since" not in script.subscribes[1]


# -- real history nodes ------------------------------------------------------------------


class Publisher:
    """A backend publishing to a history channel at a steady rate, straight to Redis
    (``wsbroker.publish``, one FCALL of the nodes' Function library), so it never
    pauses while nodes restart."""

    def __init__(self, redis_url: str, channel: str, history: str, rate: float = 20.0) -> None:
        self.redis_url = redis_url
        self.channel = channel
        self.history = [history]
        self.interval = 1 / rate
        self.offsets: list[int] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Publisher:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 10)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while not self._stop.is_set():
            published = await wsbroker.publish(self.redis_url, self.channel,
                                               {"n": len(self.offsets) + 1},
                                               history=self.history)
            assert published.offset is not None
            self.offsets.append(published.offset)
            due += self.interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(0.0, due - loop.time()))


async def wait_for_offset(tab: Tab, offset: int, timeout_ms: int = 10_000) -> None:
    await tab.until(f"events.some(e => e.kind === 'message' && e.offset === {offset})",
                    timeout_ms)


def outages(states: list[dict[str, Any]]) -> list[float]:
    """Seconds between each lost connection and the next welcome."""
    lost: list[float] = []
    since: float | None = None
    for event in states:
        if event["state"] == "connecting" and event["previous"] == "connected":
            since = event["at"]
        elif event["state"] == "connected" and since is not None:
            lost.append((event["at"] - since) / 1000)
            since = None
    assert since is None, "still disconnected at the end"
    return lost


async def test_recovers_every_offset_across_a_node_kill_and_restart(
    redis_server: RedisServer, server_process: Callable[..., ServerProcess], open_tab: OpenTab
) -> None:
    """SIGKILL the node while a backend keeps publishing: back on the restarted node,
    the page resubscribes with `since` and sees every offset once, in order."""
    args = ("--redis-url", redis_server.url, "--history", HISTORY, "--jwt-secret", SECRET)
    node = server_process(*args)
    tab: Tab = await open_tab()
    await tab.start(f"{node.http}/wsbroker.js", node.url, token=make_token(),
                    minReconnectDelay=100, maxReconnectDelay=1000)
    await tab.js(f"track('{CHANNEL}', {{ recover: true }})")
    await tab.until("events.some(e => e.kind === 'subscribed')")
    async with Publisher(redis_server.url, CHANNEL, HISTORY) as publisher:
        await eventually(lambda: len(publisher.offsets) >= 10)
        node.signal(signal.SIGKILL)
        await asyncio.to_thread(node.wait, 5)
        await eventually(lambda: len(publisher.offsets) >= 30)  # published while down
        server_process(*args, port=node.port)
        await tab.until("events.filter(e => e.kind === 'subscribed').length === 2")
        await eventually(lambda: len(publisher.offsets) >= 50)
    await wait_for_offset(tab, publisher.offsets[-1])
    assert publisher.offsets == list(range(1, len(publisher.offsets) + 1))
    offsets = [m["offset"] for m in await tab.events("message")]
    assert offsets == publisher.offsets
    first, again = await tab.events("subscribed")
    assert (first["recovered"], first["offset"]) == (False, 0)
    assert again["recovered"] is True and again["epoch"] == first["epoch"]
    assert tab.sockets[-1].ops("subscribe")[0]["since"]["epoch"] == first["epoch"]
    assert len(outages(await tab.events("state"))) == 1
