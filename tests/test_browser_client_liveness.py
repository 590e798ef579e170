"""wsbroker.js notices dead connections (SPEC §14), in real Chromium.

A node frozen with SIGSTOP keeps its TCP connections open and says nothing:
the browser would wait for minutes. The client pings a silent connection and
gives up on it after ``pingTimeout``; the browser's ``online`` event and a
hidden tab becoming visible make it check (or reconnect) at once.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.browser_client_harness import Tab, needs_chromium
from tests.helpers import SECRET, ServerProcess, make_token

pytestmark = needs_chromium

OpenTab = Callable[..., Any]
SLACK_MS = 1000  # timer and scheduling slack on a loaded 2-core machine
# Backoff delays at their ceiling: the tests below assert what `online` and
# visibility change, so the random part of the backoff must not help.
NO_JITTER = "Math.random = () => 0.999;"
VISIBLE = """() => {
    Object.defineProperty(document, 'visibilityState', { value: 'visible', configurable: true });
    log('shown', {});
    document.dispatchEvent(new Event('visibilitychange'));
}"""


@pytest.fixture
def node(server_process: Callable[..., ServerProcess]) -> Iterator[ServerProcess]:
    server = server_process("--jwt-secret", SECRET)
    yield server
    if server.process is not None and server.process.poll() is None:
        server.signal(signal.SIGCONT)  # never leave a stopped process behind


async def start(tab: Tab, node: ServerProcess, **options: Any) -> None:
    await tab.start(f"{node.http}/wsbroker.js", node.url, token=make_token("alice"), **options)
    await tab.until_state("connected")


async def test_a_stopped_node_is_detected_within_ping_interval_plus_timeout(
    node: ServerProcess, open_tab: OpenTab
) -> None:
    tab: Tab = await open_tab()
    await start(tab, node, pingInterval=1000, pingTimeout=1000, minReconnectDelay=100,
                maxReconnectDelay=500)
    await asyncio.sleep(1.5)  # let a ping round trip succeed first: no false alarm
    assert await tab.states() == ["connecting", "connected"]
    assert len(tab.sockets[0].ops("ping")) >= 1
    stopped = time.time() * 1000
    node.signal(signal.SIGSTOP)
    await tab.until_state("connecting", nth=2, timeout_ms=5000)
    (_, _, lost) = await tab.events("state")
    assert lost["code"] == 1006 and lost["reason"] == "no reply to ping"
    assert lost["at"] - stopped <= 1000 + 1000 + SLACK_MS
    node.signal(signal.SIGCONT)
    await tab.until_state("connected", nth=2)


async def test_online_reconnects_at_once(
    node: ServerProcess, open_tab: OpenTab, server_process: Callable[..., ServerProcess]
) -> None:
    """The node is back but the next attempt is 30 s away: `online` connects now."""
    tab: Tab = await open_tab(init_script=NO_JITTER)
    await start(tab, node, minReconnectDelay=30_000, maxReconnectDelay=60_000)
    node.signal(signal.SIGKILL)
    node.wait(5)
    await tab.until_state("connecting", nth=2)
    server_process("--jwt-secret", SECRET, port=node.port)
    online = time.time() * 1000
    await tab.js("() => window.dispatchEvent(new Event('online'))")
    await tab.until_state("connected", nth=2, timeout_ms=3000)
    connected = (await tab.events("state"))[-1]
    assert connected["at"] - online < 1000 + SLACK_MS
    assert len(tab.sockets) == 2


async def test_a_tab_made_visible_checks_the_connection_at_once(
    node: ServerProcess, open_tab: OpenTab
) -> None:
    """Pings are 60 s apart, yet a tab becoming visible pings at once and finds a
    stopped node dead within pingTimeout."""
    tab: Tab = await open_tab()
    await start(tab, node, pingInterval=60_000, pingTimeout=1000, minReconnectDelay=100)
    node.signal(signal.SIGSTOP)
    await tab.js(VISIBLE)
    await tab.until_state("connecting", nth=2, timeout_ms=5000)
    (shown,) = await tab.events("shown")
    lost = (await tab.events("state"))[-1]
    assert lost["reason"] == "no reply to ping"
    assert lost["at"] - shown["at"] <= 1000 + SLACK_MS
    assert len(tab.sockets[0].ops("ping")) == 1
    node.signal(signal.SIGCONT)
    await tab.until_state("connected", nth=2)


async def test_a_visible_tab_with_a_live_connection_stays_connected(
    node: ServerProcess, open_tab: OpenTab
) -> None:
    tab: Tab = await open_tab()
    await start(tab, node, pingInterval=60_000, pingTimeout=1000)
    await tab.js(VISIBLE)
    await asyncio.sleep(1.5)  # longer than pingTimeout: a missed reply would show
    assert await tab.states() == ["connecting", "connected"]
    (socket,) = tab.sockets
    assert len(socket.ops("ping")) == 1
    assert {"type": "ok"} in socket.received


async def test_a_tab_made_visible_stops_waiting_to_reconnect(
    node: ServerProcess, open_tab: OpenTab, server_process: Callable[..., ServerProcess]
) -> None:
    """A hidden tab's retry timer may be throttled for a minute: becoming visible
    connects at once."""
    tab: Tab = await open_tab(init_script=NO_JITTER)
    await start(tab, node, minReconnectDelay=30_000, maxReconnectDelay=60_000)
    node.signal(signal.SIGKILL)
    node.wait(5)
    await tab.until_state("connecting", nth=2)
    server_process("--jwt-secret", SECRET, port=node.port)
    await tab.js(VISIBLE)
    await tab.until_state("connected", nth=2, timeout_ms=3000)
    (shown,) = await tab.events("shown")
    connected = (await tab.events("state"))[-1]
    assert connected["at"] - shown["at"] < 1000 + SLACK_MS
    assert len(tab.sockets) == 2
