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
import os
import struct
from collections.abc import AsyncIterator

import orjson
import pytest

from tests.conftest import NodeFactory, node_settings
from tests.helpers import WAIT, Client, eventually, make_token
from tests.test_session_edges import HeldBackplane, held_node
from wsbroker import connection, keepalive
from wsbroker.config import RateLimit
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
