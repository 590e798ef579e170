"""Session and drain edges: crashes, releases, shutdown with work in flight (SPEC §8).

The in-process engine is wrapped so a test can hold a backplane call open (as a
slow Redis would) and see how many are in flight; everything else is real:
nodes, sockets, WebSocket clients, a JWKS endpoint that is slow to answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from tests.conftest import NodeFactory, node_settings, ws_url
from tests.helpers import WAIT, Client, eventually, make_token
from tests.test_jwks import REFETCH_INTERVAL, Clock, Jwks, clock, jwks
from wsbroker.backplane.memory import MemoryBackplane
from wsbroker.hub import Hub
from wsbroker.metrics import Metrics
from wsbroker.server import Node

__all__ = ["clock", "jwks"]  # fixtures used here


class HeldBackplane(MemoryBackplane):
    """The in-process engine, with calls a test can hold open and count."""

    def __init__(self) -> None:
        super().__init__()
        self.subscribe_gate: asyncio.Event | None = None
        self.unsubscribe_gate: asyncio.Event | None = None
        self.unsubscribing = 0
        self.most_unsubscribing = 0

    async def subscribe(self, channel: str) -> None:
        if self.subscribe_gate is not None:
            await self.subscribe_gate.wait()
        await super().subscribe(channel)

    async def unsubscribe(self, channel: str) -> None:
        self.unsubscribing += 1
        self.most_unsubscribing = max(self.most_unsubscribing, self.unsubscribing)
        try:
            if self.unsubscribe_gate is not None:
                await self.unsubscribe_gate.wait()
            await super().unsubscribe(channel)
        finally:
            self.unsubscribing -= 1

    async def publish(self, channel: str, payload: bytes) -> None:
        if channel == "boom":
            raise RuntimeError("a bug in the engine")
        await super().publish(channel, payload)


@contextlib.asynccontextmanager
async def held_node(**overrides: Any) -> AsyncIterator[tuple[Node, HeldBackplane]]:
    """A node on a :class:`HeldBackplane`, with Settings overrides; gates opened at the end."""
    engine = HeldBackplane()
    node = Node(node_settings(**overrides), backplane=engine)
    await node.start()
    try:
        yield node, engine
    finally:
        if engine.subscribe_gate is not None:
            engine.subscribe_gate.set()
        if engine.unsubscribe_gate is not None:
            engine.unsubscribe_gate.set()
        await node.stop()


@pytest.fixture
async def held() -> AsyncIterator[tuple[Node, HeldBackplane]]:
    async with held_node() as pair:
        yield pair


def metrics_of(node: Node) -> str:
    return node.metrics.render().decode()


async def test_a_session_crash_closes_1011_and_is_counted_so(
    held: tuple[Node, HeldBackplane], caplog: pytest.LogCaptureFixture
) -> None:
    node, _ = held
    async with Client.connect(ws_url(node), make_token(publish=[">"])) as client:
        await client.send({"op": "publish", "id": 1, "channel": "boom", "data": 1})
        assert await client.closed() == (1011, "internal error")
    await eventually(lambda: 'wsbroker_disconnects_total{code="1011"} 1.0' in metrics_of(node))
    crashes = [r for r in caplog.records if r.exc_info and r.name == "wsbroker.session"]
    assert len(crashes) == 1
    assert not [r for r in caplog.records if r.name.startswith("websockets") and r.exc_info]


async def test_a_closing_clients_channels_are_released_together(
    held: tuple[Node, HeldBackplane],
) -> None:
    node, engine = held
    channels = [f"c{index}" for index in range(20)]
    async with Client.connect(ws_url(node), make_token()) as client:
        for channel in channels:
            await client.subscribe(channel)
        engine.unsubscribe_gate = asyncio.Event()  # the backplane is slow to answer
    # Every channel's unsubscribe is under way at once, not one after another.
    await eventually(lambda: engine.unsubscribing == len(channels))
    engine.unsubscribe_gate.set()
    await eventually(lambda: node.hub.channel_count == 0)
    assert engine.most_unsubscribing == len(channels)


async def test_hub_close_lets_its_caller_be_cancelled() -> None:
    """A subscribe that is slow to give up must not swallow the closer's cancellation."""
    stubborn = asyncio.Event()

    class Stubborn(MemoryBackplane):
        async def subscribe(self, channel: str) -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                await stubborn.wait()  # takes its time to wind down
                raise

    engine = Stubborn()
    await engine.start()
    hub = Hub(engine, Metrics())
    subscriber = asyncio.ensure_future(hub.subscribe("x", object()))  # type: ignore[arg-type]
    await asyncio.sleep(0)  # the backplane subscribe is under way
    closing = asyncio.ensure_future(hub.close())
    await asyncio.sleep(0)  # close() waits for the stubborn subscribe
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(closing, WAIT)
    stubborn.set()
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(subscriber, WAIT)


async def test_stop_with_a_subscribe_in_flight_is_prompt_and_zeroes_the_gauges(
    held: tuple[Node, HeldBackplane],
) -> None:
    node, engine = held
    engine.subscribe_gate = asyncio.Event()  # the backplane never confirms
    async with Client.connect(ws_url(node), make_token()) as client:
        await client.send({"op": "subscribe", "id": 1, "channel": "stuck"})
        await eventually(lambda: "wsbroker_channels 1.0" in metrics_of(node))
        async with asyncio.timeout(2):  # not the 6 s websockets would wait for the handler
            await node.stop()
        assert (await client.closed())[0] == 1001
    text = metrics_of(node)
    for gauge in ("connections", "subscriptions", "channels", "backplane_up"):
        assert f"wsbroker_{gauge} 0.0" in text, gauge


async def connect_status(url: str, token: str, stack: contextlib.AsyncExitStack) -> int:
    """101 once welcomed (the connection stays open in ``stack``), else the HTTP status."""
    try:
        await stack.enter_async_context(Client.connect(url, token, how="header"))
        return 101
    except InvalidStatus as exc:
        return exc.response.status_code


async def slow_jwks_node(start_node: NodeFactory, jwks: Jwks, clock: Clock,
                         **overrides: object) -> Node:
    """A node whose next key lookup waits for the slow identity provider."""
    node = await start_node(jwks_url=jwks.url, jwt_secret=None,
                            jwt_algorithms=("RS256", "ES256"), **overrides)
    jwks.add("late")  # a key the node has not seen: the handshake must fetch it
    clock.advance(REFETCH_INTERVAL)
    jwks.delay = 1.0
    jwks.request_seen.clear()
    return node


async def test_max_connections_is_exact_while_handshakes_wait_for_keys(
    start_node: NodeFactory, jwks: Jwks, clock: Clock
) -> None:
    node = await slow_jwks_node(start_node, jwks, clock, max_connections=2)
    async with contextlib.AsyncExitStack() as stack:
        statuses = await asyncio.gather(
            *(connect_status(ws_url(node), jwks.token("late"), stack) for _ in range(5)))
    assert sorted(statuses) == [101, 101, 503, 503, 503]


async def test_a_handshake_in_flight_at_drain_is_closed_with_1012(
    start_node: NodeFactory, jwks: Jwks, clock: Clock
) -> None:
    node = await slow_jwks_node(start_node, jwks, clock)
    connecting: asyncio.Task[Client] = asyncio.ensure_future(
        _enter(Client.connect(ws_url(node), jwks.token("late"), how="header",
                              expect_welcome=False)))
    await asyncio.to_thread(jwks.request_seen.wait, WAIT)  # the handshake waits for the key
    draining = asyncio.ensure_future(node.drain())
    client = await asyncio.wait_for(connecting, WAIT)
    assert await client.closed() == (1012, "service restart")
    await asyncio.wait_for(draining, WAIT)


async def _enter(context: contextlib.AbstractAsyncContextManager[Client]) -> Client:
    """Enter ``context`` for the rest of the test (the node's stop closes it)."""
    return await context.__aenter__()

