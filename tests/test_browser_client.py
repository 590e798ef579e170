"""wsbroker.js in real headless Chromium against real nodes (SPEC §14).

The API as the SPEC shows it; close codes in the bands of SPEC §8; tokens
fetched one call at a time and refreshed in place. Each page imports the
module from the node across origins (see tests/browser_client_harness.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from tests.browser_client_harness import Tab, needs_chromium
from tests.conftest import NodeFactory, http_url, ws_url
from tests.helpers import SECRET, eventually, free_port, http_get, make_token
from tests.redis_server import RedisServer
from wsbroker.history import HistoryRules
from wsbroker.server import Node

pytestmark = needs_chromium

OpenTab = Callable[..., Any]


def module_of(node: Node) -> str:
    return http_url(node) + "/wsbroker.js"


async def subscriptions(node: Node) -> float:
    _, _, body = await asyncio.to_thread(http_get, http_url(node) + "/metrics")
    match = re.search(r"^wsbroker_subscriptions (\S+)$", body, re.MULTILINE)
    return float(match.group(1)) if match else -1.0


# -- the API ---------------------------------------------------------------------------


async def test_connects_with_a_first_auth_message_never_a_token_in_the_url(
    node: Node, open_tab: OpenTab
) -> None:
    tab: Tab = await open_tab()
    token = make_token("alice")
    await tab.start(module_of(node), ws_url(node), token=token)
    await tab.until_state("connected")
    assert await tab.states() == ["connecting", "connected"]
    assert [(e["state"], e["previous"]) for e in await tab.events("state")] == [
        ("connecting", "disconnected"), ("connected", "connecting")]
    (socket,) = tab.sockets
    assert socket.url == ws_url(node)
    assert socket.sent[0] == {"op": "auth", "token": token}
    welcome = await tab.js("client.welcome")
    assert welcome["user"] == "alice" and welcome["node"] == "test-node"
    assert tab.errors == []


async def test_subscribe_publish_and_receive(node: Node, open_tab: OpenTab) -> None:
    """One object per channel; `subscribed` then messages with `from`; publish
    resolves to the ok's fields; a handler added twice runs once."""
    tab: Tab = await open_tab()
    await tab.start(module_of(node), ws_url(node), token=make_token("alice", publish=[">"]))
    assert await tab.js("track('chat.room1') === client.subscribe('chat.room1')")
    await tab.until("events.some(e => e.kind === 'subscribed')")
    ((subscribed),) = await tab.events("subscribed")
    assert (subscribed["channel"], subscribed["recovered"]) == ("chat.room1", False)
    await tab.js("""() => {
        const sub = client.subscribe('chat.room1');
        const twice = (message) => log('twice', { data: message.data });
        sub.on('message', twice); sub.on('message', twice);
    }""")
    reply = await tab.js("client.publish('chat.room1', { text: 'hi' })")
    assert reply == {"channel": "chat.room1"}
    await tab.until("events.some(e => e.kind === 'message')")
    (message,) = await tab.events("message")
    assert (message["channel"], message["data"], message["from"]) == (
        "chat.room1", {"text": "hi"}, "alice")
    assert await tab.count("twice") == 1
    assert await subscriptions(node) == 1


async def test_requests_reject_with_the_error_code(node: Node, open_tab: OpenTab) -> None:
    tab: Tab = await open_tab()
    await tab.start(module_of(node), ws_url(node), token=make_token("alice", publish=["mine.>"]))
    await tab.until_state("connected")
    catch = "(promise) => promise.then(r => ({ ok: r }), e => ({ name: e.name, code: e.code, " \
            "isError: e instanceof Error }))"
    forbidden = await tab.js(f"({catch})(client.publish('other.x', 1))")
    assert forbidden == {"name": "WsBrokerError", "code": "forbidden", "isError": True}
    invalid = await tab.js(f"({catch})(client.publish('a..b', 1))")
    assert invalid["code"] == "invalid_channel"
    history = await tab.js(f"({catch})(client.history('mine.x', {{ limit: 5 }}))")
    assert history["code"] == "not_enabled"  # no --history on this node
    unencodable = await tab.js(f"({catch})(client.publish('mine.x', {{ n: 1n }}))")
    assert unencodable["code"] == "bad_request"
    presence = await tab.js(f"({catch})(client.presence('mine.x'))")
    assert presence["code"] in ("not_enabled", "bad_request")  # bad_request: no presence yet
    # A request in flight when the connection ends rejects with "disconnected".
    gone = await tab.js(f"""() => {{
        const pending = ({catch})(client.publish('mine.x', 1));
        client.disconnect();
        return pending;
    }}""")
    assert gone["code"] == "disconnected"
    later = await tab.js(f"({catch})(client.publish('mine.x', 1))")
    assert later["code"] == "disconnected"
    assert await tab.states() == ["connecting", "connected", "disconnected"]


async def test_history_channel_results(start_node: NodeFactory, open_tab: OpenTab) -> None:
    """On a history channel: publish resolves with `offset`, `subscribed` carries the
    position, messages carry offsets, and history() resolves to the ok's fields."""
    node = await start_node(history=HistoryRules.parse(["chat.>=100"]))
    tab: Tab = await open_tab()
    await tab.start(module_of(node), ws_url(node), token=make_token("alice", publish=[">"]))
    first = await tab.js("client.publish('chat.a', 'one')")  # queued until connected
    assert first == {"channel": "chat.a", "offset": 1}
    await tab.js("track('chat.a', { recover: true })")
    await tab.until("events.some(e => e.kind === 'subscribed')")
    (subscribed,) = await tab.events("subscribed")
    assert (subscribed["offset"], subscribed["recovered"]) == (1, False)
    assert await tab.js("client.publish('chat.a', 'two')") == {"channel": "chat.a", "offset": 2}
    await tab.until("events.some(e => e.kind === 'message')")
    (message,) = await tab.events("message")
    assert (message["data"], message["offset"]) == ("two", 2)
    history = await tab.js("client.history('chat.a', { limit: 5 })")
    assert history["channel"] == "chat.a" and history["offset"] == 2
    assert history["epoch"] == subscribed["epoch"]
    assert [(m["data"], m["offset"]) for m in history["messages"]] == [("one", 1), ("two", 2)]
    assert await tab.js("[client.subscribe('chat.a').offset, client.subscribe('chat.a').epoch]"
                        ) == [2, subscribed["epoch"]]


async def test_unsubscribe_and_a_refused_subscription(node: Node, open_tab: OpenTab) -> None:
    tab: Tab = await open_tab()
    await tab.start(module_of(node), ws_url(node), token=make_token("alice", channels=["ok.>"]))
    await tab.js("track('ok.a')")
    await tab.until("events.some(e => e.kind === 'subscribed')")
    assert await subscriptions(node) == 1
    await tab.js("client.subscribe('ok.a').unsubscribe()")
    await tab.until("events.some(e => e.kind === 'unsubscribed')")
    await eventually(lambda: _equals(subscriptions(node), 0))
    await tab.js("track('secret.b')")
    await tab.until("events.filter(e => e.kind === 'unsubscribed').length === 2")
    unsubscribed = await tab.events("unsubscribed")
    assert [(e["channel"], e["reason"]) for e in unsubscribed] == [
        ("ok.a", "client"), ("secret.b", "forbidden")]
    assert [e["code"] for e in await tab.events("suberror")] == ["forbidden"]
    assert await tab.js("client.subscribe('secret.b').state") == "subscribing"
    # Subscribing again to ok.a reuses the object, its handlers included (once each).
    await tab.js("client.subscribe('ok.a')")
    await tab.until("events.filter(e => e.kind === 'subscribed').length === 2")


async def test_a_refresh_that_narrows_the_token_ends_that_subscription(
    start_node: NodeFactory, open_tab: OpenTab
) -> None:
    node = await start_node(jwt_leeway=0)
    tab: Tab = await open_tab()
    tab.tokens.mint = lambda: make_token("alice", channels=["keep", "drop"], ttl=4)
    await tab.start(module_of(node), ws_url(node), get_token=True)
    await tab.js("track('keep'); track('drop')")
    await tab.until("events.filter(e => e.kind === 'subscribed').length === 2")
    tab.tokens.mint = lambda: make_token("alice", channels=["keep"], ttl=60)
    await tab.until("events.some(e => e.kind === 'unsubscribed')")  # at the refresh
    (event,) = await tab.events("unsubscribed")
    assert (event["channel"], event["reason"]) == ("drop", "forbidden")
    assert await tab.js("[client.subscribe('keep').state, client.state]") == [
        "subscribed", "connected"]
    assert len(tab.sockets) == 1


async def test_a_throwing_handler_does_not_break_the_client(
    node: Node, open_tab: OpenTab
) -> None:
    tab: Tab = await open_tab()
    await tab.start(module_of(node), ws_url(node), token=make_token("alice", publish=[">"]))
    await tab.js("""() => {
        const sub = client.subscribe('x');
        sub.on('message', () => { throw new Error('app bug'); });
        track('x');
    }""")
    await tab.until("events.some(e => e.kind === 'subscribed')")
    await tab.js("client.publish('x', 1)")
    await tab.js("client.publish('x', 2)")
    await tab.until("events.filter(e => e.kind === 'message').length === 2")
    assert tab.errors == ["app bug", "app bug"]
    assert await tab.js("client.state") == "connected"


async def test_a_subscribe_refused_while_redis_is_down_is_retried(
    start_node: NodeFactory, redis_server: RedisServer, open_tab: OpenTab
) -> None:
    """`unavailable` is transient: the subscription retries with backoff on the same
    connection and is subscribed once Redis is back."""
    node = await start_node(redis_url=redis_server.url)
    tab: Tab = await open_tab()
    await tab.start(module_of(node), ws_url(node), token=make_token(), minReconnectDelay=100,
                    maxReconnectDelay=400)
    await tab.until_state("connected")
    await asyncio.to_thread(redis_server.kill)
    await eventually(lambda: not node.ready)
    await tab.js("track('news')")
    await eventually(lambda: len(tab.sockets[0].ops("subscribe")) >= 2)  # refused, retried
    await asyncio.to_thread(redis_server.start)
    await tab.until("events.some(e => e.kind === 'subscribed')", timeout_ms=15_000)
    (socket,) = tab.sockets
    refused = [f for f in socket.received if f.get("id") == socket.ops("subscribe")[0]["id"]]
    assert refused[0]["code"] == "unavailable", refused
    assert await tab.events("unsubscribed") == [] and await tab.events("suberror") == []


async def _equals(value: Any, expected: float) -> bool:
    return bool(await value == expected)


# -- close codes (SPEC §8 bands) against a scripted server ---------------------------------


class ScriptedServer:
    """A real WebSocket server that welcomes every client and closes the first
    connection with a chosen code: the only way to see every band's code."""

    def __init__(self, close_code: int) -> None:
        self.close_code = close_code
        self.tokens: list[str] = []
        self.port = free_port()

    async def handler(self, connection: ServerConnection) -> None:
        import orjson

        auth = orjson.loads(await connection.recv())
        self.tokens.append(auth["token"])
        await connection.send(orjson.dumps({"type": "welcome", "client": "c", "user": "alice",
                                            "node": "scripted", "expires": time.time() + 3600}
                                           ).decode())
        if len(self.tokens) == 1:
            await connection.close(self.close_code, "scripted")
            return
        await connection.wait_closed()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[int], Any]]:
    """Start scripted servers: ``await scripted(close_code)``."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(close_code: int) -> ScriptedServer:
            server = ScriptedServer(close_code)
            await stack.enter_async_context(serve(server.handler, "127.0.0.1", server.port))
            return server

        yield start


RECONNECT = [1000, 1001, 1011, 1012, 4009]
NEEDS_TOKEN = [4001, 4003]
STOP = {1003: "unsupported_data", 1009: "message_too_big", 4008: "rate_limited"}
# Each band is one test: one browser, a page per close code, all at once
# (a browser per code would spend most of the suite's time starting Chromium).


async def each_code(codes: list[int], check: Callable[[int], Any]) -> None:
    await asyncio.gather(*(check(code) for code in codes))


async def test_reconnect_band_reconnects_with_the_same_token(
    node: Node, open_tab: OpenTab, scripted: Callable[[int], Any]
) -> None:
    async def check(code: int) -> None:
        server: ScriptedServer = await scripted(code)
        tab: Tab = await open_tab()
        await tab.start(module_of(node), server.url, get_token=True, minReconnectDelay=50)
        await tab.until_state("connected", nth=2)
        states = await tab.events("state")
        assert [(e["state"], e.get("code")) for e in states] == [
            ("connecting", None), ("connected", None), ("connecting", code),
            ("connected", None)], code
        assert tab.tokens.calls == 1, code
        assert server.tokens == tab.tokens.issued * 2, code
        assert await tab.events("error") == [], code

    await each_code(RECONNECT, check)


async def test_token_band_gets_a_new_token_first(
    node: Node, open_tab: OpenTab, scripted: Callable[[int], Any]
) -> None:
    async def check(code: int) -> None:
        server: ScriptedServer = await scripted(code)
        tab: Tab = await open_tab()
        await tab.start(module_of(node), server.url, get_token=True, minReconnectDelay=50)
        await tab.until_state("connected", nth=2)
        assert tab.tokens.calls == 2, code
        assert server.tokens == tab.tokens.issued, code
        assert server.tokens[0] != server.tokens[1], code

    await each_code(NEEDS_TOKEN, check)


async def test_token_band_without_get_token_stops_with_an_error(
    node: Node, open_tab: OpenTab, scripted: Callable[[int], Any]
) -> None:
    async def check(code: int) -> None:
        server: ScriptedServer = await scripted(code)
        tab: Tab = await open_tab()
        await tab.start(module_of(node), server.url, token=make_token(), minReconnectDelay=50)
        await tab.until_state("disconnected")
        (error,) = await tab.events("error")
        assert (error["code"], error["closeCode"]) == ("unauthorized", code)
        await asyncio.sleep(0.5)  # a reconnect would have happened by now (50 ms backoff)
        assert len(tab.sockets) == 1 and await tab.js("client.state") == "disconnected", code

    await each_code(NEEDS_TOKEN, check)


async def test_do_not_reconnect_band_stops_with_an_error(
    node: Node, open_tab: OpenTab, scripted: Callable[[int], Any]
) -> None:
    async def check(code: int) -> None:
        server: ScriptedServer = await scripted(code)
        tab: Tab = await open_tab()
        await tab.start(module_of(node), server.url, get_token=True, minReconnectDelay=50)
        await tab.until_state("disconnected")
        (error,) = await tab.events("error")
        assert (error["code"], error["closeCode"]) == (STOP[code], code)
        await asyncio.sleep(0.5)  # a reconnect would have happened by now (50 ms backoff)
        assert len(tab.sockets) == 1 and tab.tokens.calls == 1, code

    await each_code(list(STOP), check)


# -- close codes from a real node ------------------------------------------------------------


async def test_an_expired_token_is_replaced_by_get_token(
    start_node: NodeFactory, open_tab: OpenTab
) -> None:
    """The node refuses an expired first token with 4001: getToken, then connected."""
    node = await start_node(jwt_leeway=0)
    tab: Tab = await open_tab()
    await tab.start(module_of(node), ws_url(node), get_token=True, minReconnectDelay=50,
                    token=make_token(ttl=-60))
    await tab.until_state("connected")
    assert tab.tokens.calls == 1 and len(tab.sockets) == 2
    assert tab.sockets[1].sent[0] == {"op": "auth", "token": tab.tokens.issued[0]}


async def test_a_token_that_keeps_failing_backs_off_instead_of_looping(
    start_node: NodeFactory, open_tab: OpenTab
) -> None:
    node = await start_node(jwt_leeway=0)
    tab: Tab = await open_tab()
    tab.tokens.mint = lambda: make_token(ttl=-60)
    await tab.start(module_of(node), ws_url(node), get_token=True, minReconnectDelay=100,
                    maxReconnectDelay=400)
    await asyncio.sleep(2.0)  # measuring a rate: how many attempts in 2 s
    attempts = len(tab.sockets)
    # Backoff 0-100, 0-200, then 0-400 ms (mean 200): about 10 in 2 s; a loop, hundreds.
    assert 3 <= attempts <= 25, attempts
    assert tab.tokens.calls in (attempts, attempts + 1)  # one getToken per attempt
    assert await tab.js("client.state") == "connecting"
    await tab.js("client.disconnect()")


async def test_a_frame_over_the_size_limit_stops_with_1009(
    start_node: NodeFactory, open_tab: OpenTab
) -> None:
    node = await start_node(max_message_size=1024)
    tab: Tab = await open_tab()
    await tab.start(module_of(node), ws_url(node), get_token=True, minReconnectDelay=50)
    await tab.until_state("connected")
    rejected = await tab.js("client.publish('big', 'x'.repeat(4096)).catch(e => e.code)")
    assert rejected == "disconnected"
    await tab.until_state("disconnected")
    (error,) = await tab.events("error")
    assert (error["code"], error["closeCode"]) == ("message_too_big", 1009)
    await asyncio.sleep(0.5)  # a reconnect would have happened by now (50 ms backoff)
    assert len(tab.sockets) == 1


# -- tokens ------------------------------------------------------------------------------------


async def test_the_token_is_refreshed_in_place_before_it_expires(
    start_node: NodeFactory, open_tab: OpenTab
) -> None:
    """Tokens of 3-4 s (exp is whole seconds), no leeway: over 8 s the one connection
    is refreshed with `auth` ops and never closed; getToken is never called while
    a call is in flight."""
    node = await start_node(jwt_leeway=0)
    tab: Tab = await open_tab()
    tab.tokens.mint = lambda: make_token("alice", ttl=4)
    tab.tokens.delay = 0.2
    await tab.start(module_of(node), ws_url(node), get_token=True)
    await tab.js("track('news')")
    await tab.until_state("connected")
    await asyncio.sleep(8.0)  # outlive two token lifetimes
    assert await tab.states() == ["connecting", "connected"]
    (socket,) = tab.sockets
    refreshes = socket.ops("auth")[1:]
    assert len(refreshes) >= 2
    assert [frame["token"] for frame in refreshes] == tab.tokens.issued[1:len(refreshes) + 1]
    assert tab.tokens.most_active == 1
    assert await tab.events("error") == []
    assert await tab.js("client.subscribe('news').state") == "subscribed"


async def test_a_reconnect_during_a_refresh_waits_for_that_token(
    start_node: NodeFactory, open_tab: OpenTab
) -> None:
    """The node goes away while getToken is running for a refresh: the reconnect
    uses the token of that same call (getToken is not called twice), and no
    refresh `auth` op reaches the new connection."""
    first = await start_node(jwt_leeway=0, drain_seconds=0)
    tab: Tab = await open_tab()
    tab.tokens.mint = lambda: make_token("alice", ttl=3)
    await tab.start(module_of(first), ws_url(first), get_token=True, minReconnectDelay=50)
    await tab.until_state("connected")
    tab.tokens.started.clear()
    tab.tokens.delay = 1.5
    await asyncio.wait_for(tab.tokens.started.wait(), 5)  # the refresh has begun
    port = first.port
    await first.stop()
    await tab.until_state("connecting")
    second = await start_node(jwt_leeway=0, port=port)
    await tab.until_state("connected", nth=2)
    assert tab.tokens.calls == 2 and tab.tokens.most_active == 1
    fresh = tab.tokens.issued[1]
    last = tab.sockets[-1]
    assert last.sent[0] == {"op": "auth", "token": fresh}
    assert last.ops("auth")[1:] == []
    assert (await tab.js("client.welcome"))["node"] == second.settings.node_id
    assert await tab.events("error") == []


# -- reconnecting to a real process -------------------------------------------------------------


async def test_reconnects_after_a_kill_resubscribing_once(
    server_process: Callable[..., Any], open_tab: OpenTab
) -> None:
    """SIGKILL the node: the page backs off (no storm), and once the node is back it
    reconnects, resubscribes each channel once, and gets each new message once."""
    import signal

    node = server_process("--jwt-secret", SECRET)
    tab: Tab = await open_tab()
    await tab.start(f"{node.http}/wsbroker.js", node.url,
                    token=make_token("alice", publish=[">"]),
                    minReconnectDelay=100, maxReconnectDelay=800)
    await tab.js("track('room.1'); track('room.2')")
    await tab.until("events.filter(e => e.kind === 'subscribed').length === 2")
    node.signal(signal.SIGKILL)
    node.wait(5)
    await tab.until_state("connecting")
    await asyncio.sleep(2.0)  # measuring a rate: attempts while the node is down
    down_attempts = len(tab.sockets) - 1
    assert 1 <= down_attempts <= 20, down_attempts  # backoff 0-100 … 0-800 ms; no storm
    again = server_process("--jwt-secret", SECRET, port=node.port)
    await tab.until_state("connected", nth=2, timeout_ms=5000)
    await tab.until("events.filter(e => e.kind === 'subscribed').length === 4")
    last = tab.sockets[-1]
    assert sorted(frame["channel"] for frame in last.ops("subscribe")) == ["room.1", "room.2"]
    await tab.js("client.publish('room.1', 'after')")
    await tab.until("events.some(e => e.kind === 'message')")
    await asyncio.sleep(0.3)  # a duplicate would arrive right behind
    assert [m["data"] for m in await tab.events("message")] == ["after"]
    _, _, metrics = await asyncio.to_thread(http_get, again.http + "/metrics")
    assert re.search(r"^wsbroker_subscriptions 2\.0$", metrics, re.MULTILINE), metrics
    states = await tab.events("state")
    assert [(e["state"], e.get("code")) for e in states] == [
        ("connecting", None), ("connected", None), ("connecting", 1006), ("connected", None)]
