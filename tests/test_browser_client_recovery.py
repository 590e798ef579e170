"""Recovery in wsbroker.js (SPEC §7, §14): with ``recover: true`` the application
sees every offset once, in order, across reconnects.

A scripted server plays the edge cases the client must get right whatever the
timing (overlap between recovered and live messages, a lost epoch); real
history nodes show the whole path.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from websockets.asyncio.server import ServerConnection, serve

from tests.browser_client_harness import Tab, needs_chromium
from tests.conftest import http_url
from tests.helpers import free_port, make_token
from wsbroker.server import Node

pytestmark = needs_chromium

OpenTab = Callable[..., Any]
CHANNEL = "chat.room1"


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
    await tab.until("events.filter(e => e.kind === 'subscribed').length === 2")
    assert "since" not in script.subscribes[1]
