"""Client side of the WebSocket wire format, just enough for the subscribers.

Why not the websockets library: a load generator has to stay much cheaper per
delivery than the server under test, so it speaks RFC 6455 itself. Server
frames arrive unmasked (parsed inline in :mod:`wsbroker.bench.subscribers`);
client frames must be masked, and a fixed mask key is enough for a benchmark.
"""

from __future__ import annotations

from collections.abc import Mapping

MASK_KEY = b"\x37\xfa\x21\x3d"
OP_TEXT = 0x1
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
# Any valid base64 of 16 bytes will do; Sec-WebSocket-Accept is not checked:
# a server that answers 101 to this request is the one we mean to measure.
HANDSHAKE_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def upgrade_request(host: str, path: str, headers: Mapping[str, str] | None = None) -> bytes:
    """The HTTP/1.1 upgrade request (``host`` as the Host header wants it), no deflate."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    return (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {HANDSHAKE_KEY}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        f"{extra}"
        "\r\n"
    ).encode("ascii")


def _mask(payload: bytes) -> bytes:
    """XOR the payload with the fixed mask key, word-at-a-time via int arithmetic."""
    n = len(payload)
    if n == 0:
        return b""
    key = (MASK_KEY * (n // 4 + 1))[:n]
    masked = int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")
    return masked.to_bytes(n, "big")


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked, unfragmented client frame (FIN set)."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return head + MASK_KEY + _mask(payload)


def close_code(payload: bytes) -> int:
    """The status code carried by a close frame's payload (1005 when absent)."""
    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
