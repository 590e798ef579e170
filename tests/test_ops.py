"""Client operations end to end, through real WebSocket connections (SPEC §4–5)."""

from __future__ import annotations

import contextlib

import orjson
import pytest

from tests.conftest import NodeFactory, ws_url
from tests.helpers import Client, eventually, make_token
from wsbroker.server import Node


async def test_subscribe_then_backend_publish_is_delivered(node: Node) -> None:
    async with Client.connect(ws_url(node), make_token()) as client:
        reply = await client.subscribe("prices.AAPL")
        assert reply == {"type": "ok", "id": 1, "channel": "prices.AAPL"}
        await node.backplane.publish("prices.AAPL", b'{"price": 101.5}')
        assert await client.next_message() == {
            "type": "message", "channel": "prices.AAPL", "data": {"price": 101.5}}


async def test_client_publish_reaches_every_subscriber_with_from(node: Node) -> None:
    url = ws_url(node)
    async with (
        Client.connect(url, make_token("alice", publish=["chat.>"])) as alice,
        Client.connect(url, make_token("bob")) as bob,
        Client.connect(url, make_token("carol")) as carol,
    ):
        for client in (alice, bob, carol):
            await client.subscribe("chat.room1")
        reply = await alice.request("publish", channel="chat.room1", data={"text": "hi"})
        assert reply == {"type": "ok", "id": 2, "channel": "chat.room1"}
        expected = {"type": "message", "channel": "chat.room1", "data": {"text": "hi"},
                    "from": "alice"}
        for client in (alice, bob, carol):  # the publisher gets its own message too
            assert await client.next_message() == expected


async def test_a_connections_publishes_arrive_in_order(node: Node) -> None:
    url = ws_url(node)
    async with (
        Client.connect(url, make_token("pub", publish=[">"])) as publisher,
        Client.connect(url, make_token("sub")) as subscriber,
    ):
        await subscriber.subscribe("seq")
        for index in range(50):  # without waiting for each ok
            await publisher.send({"op": "publish", "channel": "seq", "data": index})
        received = [(await subscriber.next_message())["data"] for _ in range(50)]
        assert received == list(range(50))
        replies = [await publisher.receive() for _ in range(50)]
        assert all(reply == {"type": "ok", "channel": "seq"} for reply in replies)


async def test_subscribe_and_unsubscribe_are_idempotent(node: Node) -> None:
    async with Client.connect(ws_url(node), make_token()) as client:
        await client.subscribe("news")
        await client.subscribe("news")
        await node.backplane.publish("news", b"1")
        await node.backplane.publish("news", b"2")
        assert (await client.next_message())["data"] == 1
        assert (await client.next_message())["data"] == 2  # the first message came once
        assert node.hub.subscription_count == 1
        for _ in range(2):
            reply = await client.request("unsubscribe", channel="news")
            assert reply["type"] == "ok" and reply["channel"] == "news"
        assert node.hub.subscription_count == 0 and node.hub.channel_count == 0
        await node.backplane.publish("news", b"3")
        assert (await client.request("ping"))["type"] == "ok"
        with pytest.raises(TimeoutError):
            await client.next_message(timeout=0.2)


async def test_unsubscribe_from_a_channel_never_subscribed_is_ok(node: Node) -> None:
    async with Client.connect(ws_url(node), make_token()) as client:
        reply = await client.request("unsubscribe", channel="never")
        assert reply == {"type": "ok", "id": 1, "channel": "never"}


async def test_ping_answers_ok_and_replies_without_id_have_none(node: Node) -> None:
    async with Client.connect(ws_url(node), make_token()) as client:
        assert await client.request("ping") == {"type": "ok", "id": 1}
        await client.send({"op": "ping"})
        assert await client.receive() == {"type": "ok"}
        await client.send({"op": "ping", "id": "abc"})
        assert await client.receive() == {"type": "ok", "id": "abc"}


async def test_history_is_not_enabled_without_history_config(node: Node) -> None:
    async with Client.connect(ws_url(node), make_token()) as client:
        reply = await client.request("history", channel="chat.room1")
        assert reply["type"] == "error" and reply["code"] == "not_enabled"
        forbidden = make_token(channels=["other"])
    async with Client.connect(ws_url(node), forbidden) as client:
        assert (await client.request("history", channel="chat.room1"))["code"] == "forbidden"


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("this is not json", "bad_request"),
        ("[1, 2, 3]", "bad_request"),
        ('{"op": "dance", "id": 5}', "bad_request"),
        ('{"op": "subscribe", "id": 5}', "bad_request"),
        ('{"op": "publish", "channel": "a", "id": 5}', "bad_request"),
        ('{"op": "subscribe", "channel": "a..b", "id": 5}', "invalid_channel"),
        ('{"op": "history", "channel": "a", "limit": 5000, "id": 5}', "bad_request"),
        # Deeper than orjson writes back (255), but readable (it reads 1,024).
        ('{"op": "publish", "channel": "a", "id": 5, "data": ' + "[" * 300 + "]" * 300 + "}",
         "bad_request"),
        ('{"id": 5, "op": ' + "[" * 1000 + "]" * 1000 + "}", "bad_request"),
    ],
)
async def test_bad_frames_get_an_error_and_the_connection_stays_open(
    node: Node, frame: str, code: str
) -> None:
    async with (
        Client.connect(ws_url(node), make_token()) as client,
        Client.connect(ws_url(node), make_token("bystander")) as bystander,
    ):
        await bystander.subscribe("calm")
        await client.send(frame)
        reply = await client.receive()
        assert reply["type"] == "error" and reply["code"] == code
        assert reply.get("id") == (5 if '"id": 5' in frame else None)
        assert isinstance(reply["message"], str) and reply["message"]
        assert (await client.request("ping"))["type"] == "ok"
        await node.backplane.publish("calm", b'"still here"')
        assert (await bystander.next_message())["data"] == "still here"


async def test_publish_needs_a_publish_claim(node: Node) -> None:
    async with Client.connect(ws_url(node), make_token(publish=None)) as client:
        reply = await client.request("publish", channel="a", data=1)
        assert reply["type"] == "error" and reply["code"] == "forbidden"


async def test_invalid_channel_is_reported_before_permission(node: Node) -> None:
    async with Client.connect(ws_url(node), make_token(channels=[], publish=[])) as client:
        for op in ("subscribe", "publish", "history"):
            reply = await client.request(op, channel="bad..name", data=1)
            assert reply["code"] == "invalid_channel", (op, reply)


async def test_backend_payloads_raw_envelope_and_invalid(node: Node) -> None:
    async with Client.connect(ws_url(node), make_token()) as client:
        await client.subscribe("feed")
        await node.backplane.publish("feed", b'[1, "two", {"three": 3}]')
        await node.backplane.publish("feed", b'wsb1{"data": {"x": 1}, "from": "svc"}')
        await node.backplane.publish("feed", b"{not json")
        await node.backplane.publish("feed", b'"after"')
        assert (await client.next_message())["data"] == [1, "two", {"three": 3}]
        second = await client.next_message()
        assert second["data"] == {"x": 1} and second["from"] == "svc"
        assert (await client.next_message())["data"] == "after"
        metrics = node.metrics.render().decode()
        assert 'wsbroker_messages_dropped_total{reason="invalid_payload"} 1.0' in metrics


async def test_a_backend_payload_nested_too_deep_is_dropped_as_invalid(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    deep = b"[" * 300 + b"]" * 300
    async with Client.connect(ws_url(node), make_token()) as client:
        await client.subscribe("feed")
        await node.backplane.publish("feed", b'wsb1{"data": ' + deep + b"}")
        await node.backplane.publish("feed", deep)  # raw JSON is passed on byte for byte
        await node.backplane.publish("feed", b'"after"')
        assert (await client.next_message())["data"] == orjson.loads(deep)
        assert (await client.next_message())["data"] == "after"
    metrics = node.metrics.render().decode()
    assert 'wsbroker_messages_dropped_total{reason="invalid_payload"} 1.0' in metrics
    assert not [record for record in caplog.records if record.exc_info]


async def test_many_subscribers_each_get_every_message(node: Node) -> None:
    count, messages = 50, 20
    async with contextlib.AsyncExitStack() as stack:
        subscribers = [await stack.enter_async_context(Client.connect(ws_url(node), make_token()))
                       for _ in range(count)]
        for client in subscribers:
            await client.subscribe("wide")
        for index in range(messages):
            await node.backplane.publish("wide", orjson.dumps(index))
        for client in subscribers:
            got = [(await client.next_message())["data"] for _ in range(messages)]
            assert got == list(range(messages))
        assert node.hub.subscription_count == count and node.hub.channel_count == 1


async def test_subscriptions_are_released_when_a_client_disconnects(node: Node) -> None:
    async with Client.connect(ws_url(node), make_token()) as client:
        await client.subscribe("a")
        await client.subscribe("b")
        assert node.hub.subscription_count == 2
    await eventually(lambda: not node.hub.subscription_count and not node.sessions)
    assert node.hub.channel_count == 0


async def test_compression_when_enabled(start_node: NodeFactory) -> None:
    node = await start_node(compression=True)
    async with Client.connect(ws_url(node), make_token(), compression="deflate") as client:
        assert client.ws.protocol.extensions, "permessage-deflate was negotiated"
        await client.subscribe("z")
        await node.backplane.publish("z", orjson.dumps({"text": "x" * 500}))
        assert (await client.next_message())["data"] == {"text": "x" * 500}


async def test_compression_is_off_by_default(node: Node) -> None:
    async with Client.connect(ws_url(node), make_token(), compression="deflate") as client:
        assert not client.ws.protocol.extensions
