"""Webhook delivery (SPEC §13): batching, retries, refusals, the bounded queue, drain,
and fan-out that never waits for the receiver. Real node, real loopback receiver."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import orjson

from tests.conftest import NodeFactory, http_url, ws_url
from tests.helpers import Client, eventually, http_get, make_token
from tests.webhook_receiver import Receiver, Reply
from wsbroker.config import RateLimit
from wsbroker.server import Node
from wsbroker.webhooks import verify

SECRET = "whsec_" + base64.b64encode(b"d" * 32).decode()
FAST_RETRIES = (0.05, 0.05, 0.05)
NO_LIMIT = RateLimit(0, 0)


async def hooked_node(start_node: NodeFactory, receiver: Receiver, **overrides: Any) -> Node:
    settings: dict[str, Any] = {
        "webhook_url": receiver.url, "webhook_secret": (SECRET,),
        "webhook_retry_delays": FAST_RETRIES, "webhook_timeout": 0.5,
        "webhook_vacate_delay": 0.2,
        "webhook_events": ("channel_occupied", "channel_vacated", "client_publish"),
        **overrides,
    }
    return await start_node(**settings)


async def metric(node: Node, name: str, labels: str) -> float:
    """A sample from the node's /metrics, as a scraper sees it."""
    _, _, text = await asyncio.to_thread(http_get, http_url(node) + "/metrics")
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.split()[-1])
    return 0.0


async def send_ops(client: Client, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Send ops back to back (no waiting in between), then return every frame that
    came back until all were answered (replies and messages alike)."""
    for index, op in enumerate(ops):
        await client.send({**op, "id": index})
    frames, answered = [], 0
    while answered < len(ops):
        frame = await client.receive()
        frames.append(frame)
        answered += frame["type"] in ("ok", "error") and "id" in frame
    return frames


async def publish_many(client: Client, channel: str, count: int) -> None:
    """``count`` publishes of 0, 1, …; the frames that came back are kept for receive()."""
    frames = await send_ops(client, [{"op": "publish", "channel": channel, "data": index}
                                     for index in range(count)])
    assert all(frame["type"] != "error" for frame in frames), frames
    client._backlog += [frame for frame in frames if frame["type"] == "message"]


async def test_events_are_batched_within_250_ms_and_100_per_request(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    node = await hooked_node(start_node, receiver, max_subscriptions=300, rate_limit=NO_LIMIT)
    async with Client.connect(ws_url(node), make_token()) as client:
        await send_ops(client, [{"op": "subscribe", "channel": f"room.{index}"}
                                for index in range(250)])
        events = await receiver.next_events(250)
    assert sorted(event["channel"] for event in events) == sorted(
        f"room.{index}" for index in range(250))
    assert len(receiver.requests) >= 3
    for request in receiver.requests:
        assert 1 <= len(request.events) <= 100
        oldest = min(event["time_ms"] for event in request.events) / 1000
        assert request.wall - oldest < 0.25 + 0.15, "an event waited longer than 250 ms"
    assert len({request.id for request in receiver.requests}) == len(receiver.requests)


async def test_a_lone_event_goes_out_after_the_batch_window(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    node = await hooked_node(start_node, receiver)
    async with Client.connect(ws_url(node), make_token()) as client:
        started = time.monotonic()
        await client.subscribe("room.1")
        request = await receiver.next_request()
    assert 0.2 <= request.at - started < 0.25 + 0.25
    assert [event["type"] for event in request.events] == ["channel_occupied"]


async def test_5xx_and_timeouts_are_retried_with_the_same_id_freshly_signed(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    receiver.script = [Reply(503), Reply(hang=True), Reply(502), Reply(200)]
    node = await hooked_node(start_node, receiver)
    async with Client.connect(ws_url(node), make_token()) as client:
        await client.subscribe("room.1")
        attempts = [await receiver.next_request(timeout=5) for _ in range(4)]
    assert len({attempt.id for attempt in attempts}) == 1
    assert len({attempt.body for attempt in attempts}) == 1
    for attempt in attempts:
        verify(SECRET, attempt.headers, attempt.body)
    assert attempts[2].at - attempts[1].at >= 0.5 * 0.9  # the hung attempt timed out
    await eventually(lambda: node.webhooks is not None and node.webhooks.dispatcher.pending == 0)
    for result, count in (("server_error", 2), ("timeout", 1), ("success", 1)):
        assert await metric(node, "wsbroker_webhook_requests_total",
                            f'result="{result}"') == count


async def test_3xx_and_429_are_retried_and_redirects_not_followed(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    receiver.script = [Reply(302, {"Location": receiver.url + "?elsewhere"}), Reply(429)]
    node = await hooked_node(start_node, receiver)
    async with Client.connect(ws_url(node), make_token()) as client:
        await client.subscribe("room.1")
        attempts = [await receiver.next_request() for _ in range(3)]
    assert len({attempt.id for attempt in attempts}) == 1
    assert all(attempt.path == "/hooks" for attempt in attempts)  # never the Location
    assert await metric(node, "wsbroker_webhook_requests_total", 'result="redirect"') == 1


async def test_retry_after_is_honoured(start_node: NodeFactory, receiver: Receiver) -> None:
    receiver.script = [Reply(503, {"Retry-After": "1"})]
    node = await hooked_node(start_node, receiver)
    async with Client.connect(ws_url(node), make_token()) as client:
        await client.subscribe("room.1")
        first = await receiver.next_request()
        second = await receiver.next_request()
    assert first.id == second.id
    assert second.at - first.at >= 0.95, "retried before Retry-After (schedule says 50 ms)"


async def test_410_is_not_retried(start_node: NodeFactory, receiver: Receiver) -> None:
    await refused_once_and_never_again(start_node, receiver, 410)


async def test_other_4xx_are_not_retried(start_node: NodeFactory, receiver: Receiver) -> None:
    await refused_once_and_never_again(start_node, receiver, 400)


async def refused_once_and_never_again(
    start_node: NodeFactory, receiver: Receiver, status: int
) -> None:
    receiver.script = [Reply(status)]
    node = await hooked_node(start_node, receiver)
    async with Client.connect(ws_url(node), make_token()) as client:
        await client.subscribe("room.1")
        refused = await receiver.next_request()
        await asyncio.sleep(0.3)  # six retry pauses: a retry would come now
        await client.subscribe("room.2")
        following = await receiver.next_request()
    assert following.id != refused.id, "the refused request was retried"
    assert [event["channel"] for event in following.events] == ["room.2"]
    assert await metric(node, "wsbroker_webhook_events_dropped_total", 'reason="rejected"') == 1


async def test_a_hanging_receiver_never_slows_fan_out(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    receiver.default = Reply(hang=True)
    node = await hooked_node(start_node, receiver, webhook_timeout=10.0, rate_limit=NO_LIMIT)
    token = make_token(publish=[">"])
    async with Client.connect(ws_url(node), token) as publisher, \
            Client.connect(ws_url(node), make_token()) as subscriber:
        await subscriber.subscribe("ticks")
        await receiver.next_request()  # its occupied event: the receiver now hangs
        started = time.monotonic()
        await publish_many(publisher, "ticks", 500)
        received = [(await subscriber.next_message())["data"] for _ in range(500)]
        elapsed = time.monotonic() - started
    assert received == list(range(500))
    assert elapsed < 2.0, f"fan-out took {elapsed:.2f}s with a hanging receiver"
    assert node.webhooks is not None and node.webhooks.dispatcher.pending > 0


async def test_the_bounded_queue_drops_and_counts(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    receiver.default = Reply(hang=True)
    node = await hooked_node(start_node, receiver, webhook_queue=10, webhook_timeout=10.0,
                             rate_limit=NO_LIMIT)
    async with Client.connect(ws_url(node), make_token(publish=[">"])) as client:
        await client.subscribe("ticks")  # 1 event (occupied)
        await publish_many(client, "ticks", 49)  # 49 more, 40 of them over the bound
        for _ in range(49):
            await client.next_message()
    assert await metric(node, "wsbroker_webhook_events_dropped_total",
                        'reason="queue_full"') == 40
    assert node.webhooks is not None and node.webhooks.dispatcher.pending == 10


async def test_pending_batches_go_out_during_a_drain(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    receiver.script = [Reply(503)]
    node = await hooked_node(start_node, receiver, webhook_retry_delays=(60.0,),
                             drain_seconds=0.2)
    async with Client.connect(ws_url(node), make_token(publish=[">"])) as client:
        await client.subscribe("room.1")
        failed = await receiver.next_request()  # 503: its retry is a minute away
        await client.request("publish", channel="room.1", data={"n": 1})  # still in its window
        draining = asyncio.create_task(node.drain())
        await asyncio.wait_for(client.closed(), 5)
    await asyncio.wait_for(draining, 10)
    ids = [request.id for request in receiver.requests]
    assert ids.count(failed.id) == 2, "the batch waiting to retry was not tried again"
    delivered = [event for request in receiver.requests[1:] for event in request.events]
    assert {"channel_occupied", "client_publish", "channel_vacated"} <= {
        event["type"] for event in delivered}
    publish = next(event for event in delivered if event["type"] == "client_publish")
    assert publish["data"] == {"n": 1} and publish["user"] == "alice"
    assert orjson.loads(receiver.requests[-1].body)["events"]


async def test_large_publishes_go_in_batches_under_a_mebibyte(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    node = await hooked_node(start_node, receiver, rate_limit=NO_LIMIT)
    big = "x" * 60_000
    async with Client.connect(ws_url(node), make_token(publish=[">"])) as client:
        await send_ops(client, [{"op": "publish", "channel": "files", "data": big}
                                for _ in range(30)])
        events = await receiver.next_events(30)
    assert all(event["data"] == big for event in events)
    sizes = [len(request.events) for request in receiver.requests]
    assert sum(sizes) == 30 and len(sizes) >= 3, sizes
    assert all(len(request.body) < 1024 * 1024 for request in receiver.requests)


async def test_a_batch_is_dropped_and_counted_after_the_last_retry(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    receiver.default = Reply(500)
    node = await hooked_node(start_node, receiver)
    async with Client.connect(ws_url(node), make_token()) as client:
        await client.subscribe("room.1")
        attempts = [await receiver.next_request() for _ in range(1 + len(FAST_RETRIES))]
    assert len({attempt.id for attempt in attempts}) == 1
    await eventually(lambda: node.webhooks is not None and node.webhooks.dispatcher.pending == 0)
    assert await metric(node, "wsbroker_webhook_events_dropped_total",
                        'reason="retries_exhausted"') == 1
    assert len(receiver.requests) == 1 + len(FAST_RETRIES)
