"""The connection layer (connection.py, keepalive.py) against a raw client socket.

Nodes serve connections on websockets' Sans-I/O protocol, so what websockets'
asyncio layer used to guarantee is ours to keep: the upgrade's deadline,
keepalive, fragmented messages, UTF-8 checks and size limits across fragments,
the closing handshake, and a bound on the ops a client can queue. The client
here speaks WebSocket frame by frame, so each test controls exactly what the
node receives and sees every frame it sends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme

from tests.conftest import NodeFactory, node_settings
from tests.helpers import WAIT, Client, eventually, make_token
from tests.test_session_edges import HeldBackplane, held_node
from wsbroker import connection, keepalive
from wsbroker.backplane.memory import MemoryBackplane
from wsbroker.config import RateLimit
from wsbroker.history import HistoryRules
from wsbroker.server import Node

TEXT, CONT, BINARY, CLOSE, PING, PONG = 0x1, 0x0, 0x2, 0x8, 0x9, 0xA


class RawClient:
    """A WebSocket client that writes and reads single frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, node: Node, token: str | None = None) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        client = cls(reader, writer)
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        writer.write(f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                     f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                     f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{auth}\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 101 "), head
        return client

    def send(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        mask = os.urandom(4)
        masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
        first = (0x80 if fin else 0) | opcode
        if len(payload) < 126:
            head = struct.pack("!BB", first, 0x80 | len(payload))
        else:
            head = struct.pack("!BBH", first, 0x80 | 126, len(payload))
        self.writer.write(head + mask + masked)

    def send_op(self, **op: object) -> None:
        self.send(TEXT, orjson.dumps(op))

    async def frame(self, timeout: float = WAIT) -> tuple[int, bytes]:
        """The next frame from the node: (opcode, payload)."""
        async with asyncio.timeout(timeout):
            first, second = await self.reader.readexactly(2)
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
            return first & 0x0F, await self.reader.readexactly(length)

    async def json(self, timeout: float = WAIT) -> dict[str, object]:
        opcode, payload = await self.frame(timeout)
        assert opcode == TEXT, (opcode, payload)
        reply: dict[str, object] = orjson.loads(payload)
        return reply

    async def close_frame(self, timeout: float = WAIT) -> tuple[int, str]:
        """Skip to the node's close frame: (code, reason)."""
        while True:
            opcode, payload = await self.frame(timeout)
            if opcode == CLOSE:
                (code,) = struct.unpack("!H", payload[:2])
                return code, payload[2:].decode()

    async def eof(self, timeout: float = WAIT) -> None:
        """Until the node closes the TCP connection (whatever it sent before)."""
        async with asyncio.timeout(timeout):
            while await self.reader.read(65536):
                pass

    def close(self) -> None:
        self.writer.close()


async def welcomed(node: Node) -> RawClient:
    """A raw client that gave its token at the upgrade and got its ``welcome``."""
    client = await RawClient.connect(node, make_token())
    assert (await client.json())["type"] == "welcome"
    return client


@pytest.fixture
async def raw(node: Node) -> AsyncIterator[RawClient]:
    client = await welcomed(node)
    yield client
    client.close()


@pytest.fixture
def quick_keepalive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keepalive, "PING_INTERVAL", 0.4)
    monkeypatch.setattr(keepalive, "PING_TIMEOUT", 0.4)
    monkeypatch.setattr(keepalive, "SWEEP", 0.1)


async def test_a_silent_client_is_pinged_then_closed_1011(
    quick_keepalive: None, start_node: NodeFactory
) -> None:
    node = await start_node()
    client = await welcomed(node)
    opcode, _ = await client.frame()
    assert opcode == PING  # heard nothing for PING_INTERVAL
    assert await client.close_frame() == (1011, "keepalive ping timeout")
    await client.eof()
    client.close()
    await eventually(lambda: not node.sessions)


async def test_a_client_that_answers_pings_stays(
    quick_keepalive: None, start_node: NodeFactory
) -> None:
    node = await start_node()
    client = await welcomed(node)
    for _ in range(4):  # four rounds: ping, pong, silence again
        opcode, payload = await client.frame()
        assert opcode == PING
        client.send(PONG, payload)
    client.send_op(op="ping", id=7)
    reply = await client.json()
    assert reply == {"type": "ok", "id": 7}


async def test_a_client_that_keeps_talking_is_never_pinged(
    quick_keepalive: None, start_node: NodeFactory
) -> None:
    node = await start_node()
    client = await welcomed(node)
    for index in range(12):  # 1.2 s, three times interval + timeout
        client.send_op(op="ping", id=index)
        assert await client.json() == {"type": "ok", "id": index}  # never a PING first
        await asyncio.sleep(0.1)


async def test_a_client_that_never_sends_its_upgrade_is_dropped(
    monkeypatch: pytest.MonkeyPatch, node: Node
) -> None:
    monkeypatch.setattr(connection, "HANDSHAKE_TIMEOUT", 0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    writer.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
    async with asyncio.timeout(WAIT):
        assert await reader.read() == b""
    writer.close()
    async with Client.connect(f"ws://127.0.0.1:{node.port}/ws", make_token()) as healthy:
        assert (await healthy.request("ping"))["type"] == "ok"


async def test_a_fragmented_op_with_a_ping_inside_is_answered(raw: RawClient) -> None:
    op = orjson.dumps({"op": "subscribe", "id": 3, "channel": "news"})
    raw.send(TEXT, op[:10], fin=False)
    raw.send(PING, b"mid")  # control frames may come between fragments
    raw.send(CONT, op[10:20], fin=False)
    raw.send(CONT, op[20:])
    assert await raw.frame() == (PONG, b"mid")
    assert await raw.json() == {"type": "ok", "id": 3, "channel": "news"}


async def test_fragments_past_the_size_limit_close_1009(start_node: NodeFactory) -> None:
    node = await start_node(max_message_size=1000)
    client = await welcomed(node)
    for _ in range(3):  # 600 bytes each: only the whole is too big
        client.send(TEXT if _ == 0 else CONT, b" " * 600, fin=False)
    code, _reason = await client.close_frame()
    assert code == 1009
    await client.eof()


async def test_invalid_utf8_closes_1007(raw: RawClient) -> None:
    raw.send(TEXT, b'{"op":"ping","id":"\xff"}')
    code, _reason = await raw.close_frame()
    assert code == 1007


async def test_a_binary_message_closes_1003_even_when_fragmented(raw: RawClient) -> None:
    raw.send(BINARY, b"\x00" * 10, fin=False)
    raw.send(CONT, b"\x00" * 10)
    assert await raw.close_frame() == (1003, "binary frames are not supported")


async def test_the_close_handshake_is_echoed_and_the_tcp_connection_closed(
    raw: RawClient, node: Node
) -> None:
    raw.send(CLOSE, struct.pack("!H", 1000) + b"bye")
    assert await raw.close_frame() == (1000, "bye")
    await raw.eof()
    raw.close()
    await eventually(lambda: not node.sessions)


@pytest.fixture
async def held_unlimited() -> AsyncIterator[tuple[Node, HeldBackplane]]:
    """A node whose backplane a test can hold, with no rate limit on ops."""
    async with held_node(rate_limit=RateLimit(0, 0)) as pair:
        yield pair


async def test_ops_waiting_behind_a_slow_one_are_bounded_and_all_answered_in_order(
    held_unlimited: tuple[Node, HeldBackplane],
) -> None:
    """A subscribe that waits on the backplane holds the ops behind it; a client that
    keeps sending meanwhile stops being read once MAX_WAITING_OPS wait, so what it
    sends waits in kernel buffers, not in the node (beyond what one read of the
    socket held). Nothing is lost or reordered."""
    node, engine = held_unlimited
    engine.subscribe_gate = asyncio.Event()
    client = await welcomed(node)
    client.send_op(op="subscribe", id=0, channel="slow")
    count, pad = 10_000, "x" * 1000  # 10 MB: more than loopback's kernel buffers hold
    for index in range(1, count + 1):
        client.send_op(op="ping", id=index, pad=pad)

    async def written() -> bool:
        await asyncio.sleep(0.05)
        return client.writer.transport.get_write_buffer_size() > 0

    await eventually(written)  # the node stopped reading: our sends pile up here
    (session,) = node.sessions
    waiting = sum(len(op) for op in session._inbox)
    assert waiting < 512 * 1024, f"{waiting} bytes of ops wait in the node"
    engine.subscribe_gate.set()
    assert await client.json() == {"type": "ok", "id": 0, "channel": "slow"}
    for index in range(1, count + 1):
        assert await client.json() == {"type": "ok", "id": index}
    client.close()


async def test_stop_closes_open_connections_1001() -> None:
    node = Node(node_settings())
    await node.start()
    client = await welcomed(node)
    stopping = asyncio.ensure_future(node.stop())
    code, _ = await client.close_frame()
    assert code == 1001
    client.send(CLOSE, struct.pack("!H", 1001))
    await client.eof()
    client.close()
    await asyncio.wait_for(stopping, WAIT)


# -- found in review: each of these failed on the first version of connection.py --------


@pytest.mark.parametrize("one_write", [True, False])
async def test_a_publish_sent_right_before_the_close_is_delivered(
    node: Node, one_write: bool
) -> None:
    """A browser's ``send(); close()``: the close frame may come in the same read as
    the publish, or right after it, before the op's turn. The publish still goes out."""
    async with Client.connect(f"ws://127.0.0.1:{node.port}/ws", make_token("bob")) as watcher:
        await watcher.subscribe("news")
        client = await RawClient.connect(node, make_token(publish=[">"]))
        assert (await client.json())["type"] == "welcome"
        publish = {"op": "publish", "id": 1, "channel": "news", "data": {"last": "words"}}
        client.send(TEXT, orjson.dumps(publish))
        if not one_write:
            await client.writer.drain()
        client.send(CLOSE, struct.pack("!H", 1000))
        message = await watcher.next_message()
        assert message["data"] == {"last": "words"}
        client.close()


@pytest.mark.parametrize("request_bytes", [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n\r\n",  # a stray CRLF after the request
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Authorization: Bearer TOKEN\r\n\r\n\x81\x05hello",  # an unmasked frame
])
async def test_bytes_after_the_request_that_are_no_frame_close_the_connection_quietly(
    node: Node, caplog: pytest.LogCaptureFixture, request_bytes: bytes
) -> None:
    """websockets gives up on a connection whose first bytes after the request are
    no valid frame (HTTP pipelining is not spoken here): the node closes it, with
    no traceback and nothing left behind."""
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    writer.write(request_bytes.replace(b"TOKEN", make_token().encode()))
    async with asyncio.timeout(WAIT):
        await reader.read()  # until the node closes; what it sent before does not matter
    writer.close()
    await eventually(lambda: not node._connections and not node.sessions)
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


async def test_tcp_connects_that_never_finish_tls_leave_nothing_behind(
    tmp_path: Path, ca: trustme.CA
) -> None:
    """A load balancer's TCP health check, or plain HTTP on the TLS port: asyncio never
    tells the connection about it, so the node must not count on hearing of it."""
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    node = Node(node_settings(tls_cert=str(tmp_path / "cert.pem"),
                              tls_key=str(tmp_path / "key.pem")))
    await node.start()
    try:
        for _ in range(3):
            _, writer = await asyncio.open_connection("127.0.0.1", node.port)
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(WAIT):
                await reader.read()
            writer.close()
        assert not node._connections
    finally:
        await asyncio.wait_for(node.stop(), WAIT)


class HeldHistoryReads(MemoryBackplane):
    """The in-process engine with history reads a test holds open (a slow Redis)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = asyncio.Event()

    async def read_since(self, *args: Any, **kwargs: Any) -> Any:
        await self.reads.wait()
        return await super().read_since(*args, **kwargs)


async def test_stop_with_a_history_subscribe_in_flight_releases_the_session_promptly() -> None:
    engine = HeldHistoryReads()
    node = Node(node_settings(history=HistoryRules.parse(["h.>=100"])), backplane=engine)
    await node.start()
    async with Client.connect(f"ws://127.0.0.1:{node.port}/ws", make_token()) as client:
        await client.send({"op": "subscribe", "id": 1, "channel": "h.x"})  # held on the read
        (session,) = node.sessions
        await eventually(lambda: session._worker is not None)
        started = time.monotonic()
        await asyncio.wait_for(node.stop(), WAIT)
        assert time.monotonic() - started < 2
        assert not node.sessions
