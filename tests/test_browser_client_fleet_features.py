"""wsbroker.js against the node's presence, join/leave and HTTP API, in real Chromium.

The other browser suites use a scripted server for what a node could not do
when the client was written (4003, join/leave); here a real node does it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.api_client import KEY, api
from tests.browser_client_harness import Tab, needs_chromium
from tests.conftest import NodeFactory, http_url, ws_url
from tests.helpers import Client, make_token
from wsbroker.channels import PatternSet

pytestmark = needs_chromium

OpenTab = Callable[..., Any]
CHAT = PatternSet.parse(["chat.>"])


async def test_join_leave_and_presence_reach_the_page(
    start_node: NodeFactory, open_tab: OpenTab
) -> None:
    node = await start_node(presence=CHAT, join_leave=CHAT)
    tab: Tab = await open_tab()
    await tab.start(http_url(node) + "/wsbroker.js", ws_url(node),
                    token=make_token("alice", info={"name": "Alice"}))
    await tab.js("""() => {
        const sub = track('chat.room1');
        sub.on('join', (member) => log('join', { member }));
        sub.on('leave', (member) => log('leave', { member }));
    }""")
    await tab.until("events.some(e => e.kind === 'subscribed')")
    async with Client.connect(ws_url(node), make_token("bob")) as bob:
        await bob.subscribe("chat.room1")
        await tab.until("events.some(e => e.kind === 'join')")
        (join,) = await tab.events("join")
        assert join["member"]["user"] == "bob" and "info" not in join["member"]
        presence = await tab.js("client.presence('chat.room1')")
        assert sorted(member["user"] for member in presence["members"]) == ["alice", "bob"]
        alice = next(m for m in presence["members"] if m["user"] == "alice")
        assert alice["info"] == {"name": "Alice"}
        await bob.request("unsubscribe", channel="chat.room1")
    await tab.until("events.some(e => e.kind === 'leave')")
    (leave,) = await tab.events("leave")
    assert leave["member"]["user"] == "bob"
    assert await tab.count("join", "e.member.user === 'alice'") == 0  # never its own
    assert tab.errors == []


async def test_an_operator_disconnect_gets_a_fresh_token_then_reconnects(
    start_node: NodeFactory, open_tab: OpenTab
) -> None:
    node = await start_node(api_port=0, api_key=(KEY,))
    tab: Tab = await open_tab()
    await tab.start(http_url(node) + "/wsbroker.js", ws_url(node), get_token=True)
    await tab.js("track('news')")
    await tab.until("events.some(e => e.kind === 'subscribed')")
    assert tab.tokens.calls == 1
    async with api(node) as backend:
        status, answer = await backend.post("/api/disconnect", {"user": "alice"})
    assert (status, answer) == (200, {"user": "alice"})
    await tab.until("events.filter(e => e.kind === 'subscribed').length >= 2")
    closes = [event for event in await tab.events("state") if event.get("code")]
    assert [event["code"] for event in closes] == [4003]
    assert tab.tokens.calls == 2  # a fresh token before reconnecting, one call
    assert len(tab.sockets) == 2 and tab.sockets[1].sent[0]["token"] == tab.tokens.issued[1]
    assert tab.errors == []
