"""A burst into a wide channel: the node keeps draining Redis (issue 3, item 9).

10,000 messages published back to back to a channel with 1,000 subscribers on
one node: Redis must never hold more for the node's pub/sub connection than
its pubsub output-buffer soft limit (8 MiB by default), because the reader
never waits on a client, and every subscriber must get every message.

The subscribers are raw asyncio sockets that only count message frames, so the
test process stays far cheaper than the node it loads.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable
from urllib.parse import quote

import orjson

from tests.helpers import SECRET, ServerProcess, http_get, make_token
from tests.redis_server import RedisServer, numsub

SUBSCRIBERS = 1000
MESSAGES = 10_000
PUBSUB_SOFT_LIMIT = 8 * 1024 * 1024
MARKER = b'"type":"message"'


class CountingSubscriber(asyncio.Protocol):
    """Upgrades, subscribes to one channel, then counts message frames it receives."""

    def __init__(self, host: str, port: int, token: str, channel: str) -> None:
        self.request = (
            f"GET /ws?token={quote(token)} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        self.subscribe = _masked_text(orjson.dumps({"op": "subscribe", "channel": channel,
                                                    "id": 1}))
        self.subscribed = asyncio.get_running_loop().create_future()
        self.received_all = asyncio.get_running_loop().create_future()
        self.messages = 0
        self._tail = b""
        self._upgraded = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self._upgraded:
            self._upgraded = True
            assert data.startswith(b"HTTP/1.1 101"), data[:200]
            assert self.transport is not None
            self.transport.write(self.subscribe)
        chunk = self._tail + data
        if not self.subscribed.done() and b'"type":"ok"' in chunk:
            self.subscribed.set_result(None)
        self.messages += chunk.count(MARKER) - self._tail.count(MARKER)
        self._tail = chunk[-len(MARKER):]
        if self.messages >= MESSAGES and not self.received_all.done():
            self.received_all.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError("closed before subscribing"))


def _masked_text(payload: bytes) -> bytes:
    mask = b"\x00\x00\x00\x00"  # a zero mask is a valid mask and leaves the payload as is
    assert len(payload) < 126
    return bytes((0x81, 0x80 | len(payload))) + mask + payload


def _watch_pubsub_omem(redis: RedisServer, stop: threading.Event, peak: list[int]) -> None:
    """Record the largest output buffer Redis holds for any pub/sub client."""
    with redis.client() as client:
        while not stop.is_set():
            for entry in client.client_list():
                if "P" in entry.get("flags", ""):
                    peak[0] = max(peak[0], int(entry["omem"]))
            time.sleep(0.02)


async def test_burst_to_a_wide_channel_never_backs_up_redis(
    redis_server: RedisServer, server_process: Callable[..., ServerProcess]
) -> None:
    server = server_process("--redis-url", redis_server.url, "--jwt-secret", SECRET,
                            "--max-connections", "0", "--max-send-buffer", "8MiB")
    loop = asyncio.get_running_loop()
    token = make_token()
    subscribers: list[CountingSubscriber] = []
    for _ in range(SUBSCRIBERS):
        _, protocol = await loop.create_connection(
            lambda: CountingSubscriber("127.0.0.1", server.port, token, "burst"),
            "127.0.0.1", server.port,
        )
        subscribers.append(protocol)
    try:
        async with asyncio.timeout(30):
            await asyncio.gather(*(subscriber.subscribed for subscriber in subscribers))
        assert numsub(redis_server, "ws:burst") == {"ws:burst": 1}

        stop, peak = threading.Event(), [0]
        watcher = threading.Thread(target=_watch_pubsub_omem, args=(redis_server, stop, peak))
        watcher.start()
        started = time.monotonic()
        try:
            with redis_server.client() as backend:
                pipe = backend.pipeline(transaction=False)
                for index in range(MESSAGES):
                    pipe.publish("ws:burst", orjson.dumps({"n": index, "px": 101.25}))
                await asyncio.to_thread(pipe.execute)
            async with asyncio.timeout(120):
                await asyncio.gather(*(subscriber.received_all for subscriber in subscribers))
        finally:
            stop.set()
            watcher.join(5)
        elapsed = time.monotonic() - started
        assert [s.messages for s in subscribers] == [MESSAGES] * SUBSCRIBERS
        assert peak[0] < PUBSUB_SOFT_LIMIT, f"Redis buffered {peak[0]} bytes for the node"
        metrics = (await asyncio.to_thread(http_get, server.http + "/metrics"))[2]
        assert "wsbroker_backplane_reconnects_total 0.0" in metrics
        delivered = re.search(r"^wsbroker_messages_delivered_total (\S+)$", metrics, re.M)
        assert delivered is not None and float(delivered[1]) == SUBSCRIBERS * MESSAGES
        print(f"\n{SUBSCRIBERS * MESSAGES} deliveries in {elapsed:.1f}s; "
              f"peak Redis omem for the node {peak[0]} bytes")
    finally:
        for subscriber in subscribers:
            if subscriber.transport is not None:
                subscriber.transport.close()
