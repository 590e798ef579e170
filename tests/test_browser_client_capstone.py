"""A browser tab survives a rolling restart (issue: the browser client, item 6).

Two ``wsbroker serve --history`` nodes on one real ``redis-server``, behind the
committed HAProxy config of ``deploy/`` terminating TLS; a page in real
Chromium imports wsbroker.js through the proxy and subscribes with
``recover: true``; a backend publishes 20 messages a second throughout; the
operator restarts the fleet one node at a time (SIGTERM node 1, wait for it to
exit, start it again, wait until HAProxy has it back, then node 2). The page
ends with every offset exactly once, in order, and was disconnected at most
twice, each time for under 2 s.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trustme

from tests.browser_client_harness import Tab, needs_chromium
from tests.helpers import SECRET, ServerProcess, eventually, make_token
from tests.redis_server import RedisServer
from tests.test_browser_client_recovery import Publisher, outages, wait_for_offset
from tests.test_proxies import Proxy, haproxy_binary, haproxy_servers, start_haproxy

pytestmark = needs_chromium

CHANNEL = "chat.room1"
HISTORY = "chat.>=10000"
NODE_ARGS = ("--history", HISTORY, "--jwt-secret", SECRET, "--drain-seconds", "1",
             "--trusted-proxies", "127.0.0.1")


async def test_a_page_survives_a_rolling_restart_behind_haproxy(
    tmp_path: Path, ca: trustme.CA, client_tls: Any, redis_server: RedisServer,
    server_process: Callable[..., ServerProcess], open_tab: Callable[..., Any],
) -> None:
    haproxy_binary()
    nodes = {name: server_process("--redis-url", redis_server.url, "--node-id", name, *NODE_ARGS)
             for name in ("node-a", "node-b")}
    pem = tmp_path / "haproxy.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(pem)
    proxy, admin = start_haproxy(tmp_path, pem, nodes, client_tls)
    try:
        await rolling_restart(proxy, admin, nodes, redis_server, server_process, open_tab)
    finally:
        proxy.stop()


async def rolling_restart(
    proxy: Proxy, admin: Path, nodes: dict[str, ServerProcess], redis_server: RedisServer,
    server_process: Callable[..., ServerProcess], open_tab: Callable[..., Any],
) -> None:
    edge = f"127.0.0.1:{proxy.port}"

    # The page trusts the proxy's certificate as a browser trusts a real one.
    tab: Tab = await open_tab(ignore_https_errors=True)
    await tab.start(f"https://{edge}/wsbroker.js", f"wss://{edge}/ws", token=make_token())
    await tab.js(f"track('{CHANNEL}', {{ recover: true }})")
    await tab.until("events.some(e => e.kind === 'subscribed')")

    async def back_in_rotation(name: str) -> None:
        server = {"node-a": "node1", "node-b": "node2"}[name]
        await eventually(lambda: haproxy_servers(admin)[server]["status"] == "UP", timeout=15)

    async with Publisher(redis_server.url, CHANNEL, HISTORY) as publisher:

        async def published(more: int) -> None:
            """Let the backend publish ``more`` messages (at 20/s) before going on."""
            target = len(publisher.offsets) + more
            await eventually(lambda: len(publisher.offsets) >= target, timeout=10)

        await published(20)
        for name, node in list(nodes.items()):
            node.signal(signal.SIGTERM)
            assert await asyncio.to_thread(node.wait, 15) == 0
            await published(10)  # the fleet runs on one node meanwhile
            nodes[name] = server_process("--redis-url", redis_server.url, "--node-id", name,
                                         *NODE_ARGS, port=node.port)
            await back_in_rotation(name)
            await published(10)
        await published(20)
    proxy.check_running()

    await wait_for_offset(tab, publisher.offsets[-1])
    assert publisher.offsets == list(range(1, len(publisher.offsets) + 1))
    offsets = [m["offset"] for m in await tab.events("message")]
    assert offsets == publisher.offsets, "not every offset once, in order"
    lost = outages(await tab.events("state"))
    # One close per node the page was on: once or twice, depending on where it was.
    assert 1 <= len(lost) <= 2 and all(seconds < 2 for seconds in lost), lost
    for event in (await tab.events("subscribed"))[1:]:
        assert event["recovered"] is True, event
    assert await tab.events("error") == []
    assert tab.errors == []
