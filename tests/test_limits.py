"""Every limit of SPEC §8 with the error or close code a client sees."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from tests.conftest import NodeFactory, ws_url
from tests.helpers import SECRET, WAIT, Client, ServerProcess, eventually, http_get, make_token
from wsbroker.config import RateLimit
from wsbroker.connection import CLOSE_TIMEOUT
from wsbroker.server import Node


async def test_oversized_frame_closes_1009_and_others_are_unaffected(node: Node) -> None:
    async with (
        Client.connect(ws_url(node), make_token()) as big,
        Client.connect(ws_url(node), make_token("other")) as other,
    ):
        await other.subscribe("calm")
        await big.send('{"op":"ping","pad":"' + "x" * (64 * 1024) + '"}')
        code, _ = await big.closed()
        assert code == 1009
        await node.backplane.publish("calm", b"1")
        assert (await other.next_message())["data"] == 1


async def test_a_frame_just_under_the_limit_is_fine(start_node: NodeFactory) -> None:
    node = await start_node(max_message_size=4096)
    async with Client.connect(ws_url(node), make_token()) as client:
        frame = '{"op":"ping","id":1,"pad":"' + "x" * 4000 + '"}'
        assert len(frame) <= 4096
        await client.send(frame)
        assert (await client.receive())["type"] == "ok"


async def test_binary_frame_closes_1003(node: Node) -> None:
    async with Client.connect(ws_url(node), make_token()) as client:
        await client.ws.send(b'{"op":"ping"}')
        code, _ = await client.closed()
        assert code == 1003


async def test_too_many_subscriptions(start_node: NodeFactory) -> None:
    node = await start_node(max_subscriptions=2)
    async with Client.connect(ws_url(node), make_token()) as client:
        await client.subscribe("a")
        await client.subscribe("b")
        await client.subscribe("a")  # already held: not a new subscription
        reply = await client.request("subscribe", channel="c")
        assert reply["type"] == "error" and reply["code"] == "too_many_subscriptions"
        await client.request("unsubscribe", channel="a")
        await client.subscribe("c")


async def test_rate_limited_ops_get_an_error_and_the_connection_stays(
    start_node: NodeFactory,
) -> None:
    node = await start_node(rate_limit=RateLimit(1, 5))
    async with Client.connect(ws_url(node), make_token()) as client:
        for index in range(8):
            await client.send({"op": "ping", "id": index})
        replies = [await client.receive() for _ in range(8)]
        assert [reply["type"] for reply in replies] == ["ok"] * 5 + ["error"] * 3
        assert {reply["code"] for reply in replies[5:]} == {"rate_limited"}
        assert [reply["id"] for reply in replies] == list(range(8))
        await asyncio.sleep(1.1)  # the bucket refills with time, not with an event
        assert (await client.request("ping"))["type"] == "ok"


async def test_persistent_flooding_closes_4008(start_node: NodeFactory) -> None:
    node = await start_node(rate_limit=RateLimit(1, 1))
    async with Client.connect(ws_url(node), make_token()) as client:
        async def flood() -> None:
            with contextlib.suppress(Exception):
                while True:
                    await client.send({"op": "ping"})
                    await asyncio.sleep(0.1)

        flooding = asyncio.create_task(flood())
        try:
            code, reason = await client.closed(timeout=8)
        finally:
            flooding.cancel()
        assert code == 4008, reason


async def test_max_connections_answers_503_at_the_handshake(start_node: NodeFactory) -> None:
    node = await start_node(max_connections=2)
    url = ws_url(node)
    async with Client.connect(url, make_token()), Client.connect(url, how="none"):
        with pytest.raises(InvalidStatus) as refused:
            async with Client.connect(url, make_token()):
                pass
        assert refused.value.response.status_code == 503
    await eventually(lambda: not node.sessions)
    async with Client.connect(url, make_token()) as again:
        assert again.welcome is not None


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_slow_consumer_is_cut_with_4009_and_others_get_everything(
    server_process: Callable[..., ServerProcess],
) -> None:
    """A reader that stops reading is closed once 256 KiB are queued for it; a healthy
    subscriber of the same channel receives all 64 MiB, and the node's memory stays
    bounded (an unbounded buffer would grow by tens of MiB)."""
    server = server_process("--jwt-secret", SECRET, "--rate-limit", "0",
                            "--max-send-buffer", "256KiB")
    assert server.process is not None
    token = make_token(publish=[">"], secret=SECRET)
    messages, blob = 4000, "x" * 16_000
    async with (
        Client.connect(server.url, token, max_size=None) as slow,
        Client.connect(server.url, token, max_size=None) as healthy,
        Client.connect(server.url, token) as publisher,
    ):
        await slow.subscribe("firehose")
        await healthy.subscribe("firehose")
        slow.ws.transport.pause_reading()  # it stops reading: the kernel buffers fill up
        rss_before = _rss_kib(server.process.pid)

        received: list[int] = []
        progress = asyncio.Condition()

        async def publish_all() -> None:
            # Keep at most 32 messages in flight to the healthy reader, which shares
            # this process's CPU with the publisher; the slow one is never waited for.
            for index in range(messages):
                async with progress:
                    await progress.wait_for(lambda i=index: i - len(received) < 32)
                await publisher.send({"op": "publish", "channel": "firehose",
                                      "data": {"i": index, "blob": blob}})

        async def receive_all() -> None:
            for _ in range(messages):
                message = await healthy.next_message(timeout=20)
                async with progress:
                    received.append(message["data"]["i"])
                    progress.notify_all()

        async with asyncio.timeout(60):
            await asyncio.gather(publish_all(), receive_all())
        assert received == list(range(messages))
        rss_growth_mib = (_rss_kib(server.process.pid) - rss_before) / 1024
        slow.ws.transport.resume_reading()
        code, reason = await slow.closed(timeout=20)
        assert (code, reason) == (4009, "slow consumer")
        assert rss_growth_mib < 24, f"server RSS grew by {rss_growth_mib:.1f} MiB"
        assert (await publisher.request("ping", timeout=20))["type"] == "ok"


async def test_a_client_that_never_reads_again_is_dropped_after_the_cut(
    server_process: Callable[..., ServerProcess],
) -> None:
    """The 4009 close frame sits behind data the client never reads: the node must
    not wait for it forever, but drop the connection within the close timeout."""
    server = server_process("--jwt-secret", SECRET, "--rate-limit", "0",
                            "--max-send-buffer", "256KiB")
    token = make_token(publish=[">"])
    blob = "x" * 16_000

    async def metric(name: str) -> str:
        return (await asyncio.to_thread(http_get, server.http + "/metrics"))[2]

    async with (
        Client.connect(server.url, token) as stuck,
        Client.connect(server.url, token) as publisher,
    ):
        await stuck.subscribe("firehose")
        stuck.ws.transport.pause_reading()  # and it never resumes

        for _ in range(20):  # 32 MB: far more than the kernel's socket buffers hold
            for _ in range(100):
                await publisher.send({"op": "publish", "channel": "firehose", "data": blob})
            for _ in range(100):
                assert (await publisher.receive())["type"] == "ok"
        assert 'wsbroker_messages_dropped_total{reason="slow_consumer"} 1.0' in (
            await metric("dropped"))

        async def dropped() -> bool:
            return "wsbroker_connections 1.0" in await metric("connections")

        await eventually(dropped, timeout=CLOSE_TIMEOUT + 5)
        assert 'wsbroker_disconnects_total{code="4009"} 1.0' in await metric("disconnects")


def _masked_ping(payload: bytes) -> bytes:
    """A client PING frame (clients must mask, RFC 6455 §5.3)."""
    mask = b"\x01\x02\x03\x04"
    masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
    return bytes((0x89, 0x80 | len(payload))) + mask + masked


async def test_a_client_flooding_pings_without_reading_is_cut_and_memory_stays_bounded(
    server_process: Callable[..., ServerProcess],
) -> None:
    """No token needed: a raw socket upgrades, then sends PINGs and never reads. The
    PONGs the node owes count against --max-send-buffer like any frame: the client
    is cut, the node stops reading it, and a normal client keeps working."""
    server = server_process("--jwt-secret", SECRET, "--max-send-buffer", "256KiB")
    assert server.process is not None
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # it never reads
    sock.connect(("127.0.0.1", server.port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                 "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert head.startswith(b"HTTP/1.1 101 ")
    burst = _masked_ping(b"p" * 125) * 1000  # 131 KB of PINGs, 127 KB of PONGs owed
    rss_before = _rss_kib(server.process.pid)
    async with Client.connect(server.url, make_token()) as healthy:
        sent = 0
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(8):  # unbounded queuing would reach ~500 MB by then
                while True:
                    writer.write(burst)
                    # Once the node stops reading us, the kernel's buffers fill and
                    # this waits: the flood is over.
                    await asyncio.wait_for(writer.drain(), 2)
                    sent += len(burst)
        rss_growth_mib = (_rss_kib(server.process.pid) - rss_before) / 1024
        assert rss_growth_mib < 24, f"server RSS grew by {rss_growth_mib:.1f} MiB ({sent} B sent)"
        assert (await healthy.request("ping"))["type"] == "ok"

        async def metrics() -> str:
            return (await asyncio.to_thread(http_get, server.http + "/metrics"))[2]

        async def cut() -> bool:
            return "wsbroker_connections 1.0" in await metrics()

        await eventually(cut, timeout=CLOSE_TIMEOUT + 5)
        text = await metrics()
        assert 'wsbroker_messages_dropped_total{reason="slow_consumer"} 1.0' in text
        assert 'wsbroker_disconnects_total{code="4009"} 1.0' in text
        assert (await healthy.request("ping"))["type"] == "ok"
    writer.transport.abort()
