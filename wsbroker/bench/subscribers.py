"""Thousands of raw WebSocket subscribers in one process, and what they count.

Why it looks like this: to measure a server, the subscribers must never be the
bottleneck. So each one is a bare ``asyncio.Protocol`` (on uvloop when
available) that does the HTTP upgrade and frame parsing itself; per delivery it
does one regex search and a few integer operations, and it reads the clock once
per received chunk rather than once per frame. TLS (``wss://``) goes through the
event loop's own TLS transport, so the hot path is the same either way.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import orjson

from wsbroker.bench import wire
from wsbroker.bench.messages import MESSAGE_RE

time_ns = time.time_ns


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the subscribers connect: a ``ws://`` or ``wss://`` URL, taken apart."""

    host: str
    port: int
    path: str
    host_header: str
    tls: ssl.SSLContext | None = None

    @classmethod
    def from_url(cls, url: str, tls: ssl.SSLContext | None = None) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"{url!r} is not a ws:// or wss:// URL")
        secure = parts.scheme == "wss"
        if secure and tls is None:
            tls = ssl.create_default_context()
        port = parts.port or (443 if secure else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.hostname, port, path, parts.netloc.rpartition("@")[2],
                   tls if secure else None)


class SubscribeFailed(Exception):
    """A subscriber could not connect, upgrade or subscribe."""


class Counters:
    """Delivery counters for the current step, shared by every subscriber."""

    __slots__ = (
        "dups",
        "first_ns",
        "gaps",
        "last_ns",
        "late",
        "latencies_us",
        "step",
        "step_bytes",
        "unique",
    )

    def __init__(self, step: int) -> None:
        self.step = step
        self.step_bytes = b"%d" % step  # compared as bytes: cheaper than int() per frame
        self.unique = 0
        self.dups = 0
        self.gaps = 0
        self.late = 0
        self.first_ns = 0
        self.last_ns = 0
        self.latencies_us = array("q")


@dataclass(eq=False)
class Audience:
    """The whole subscriber population and what it has seen this step."""

    endpoint: Endpoint
    token: str | None = None
    """The token every subscriber presents (``Authorization: Bearer``), or None."""
    mint: Callable[[int], str] | None = None
    """Mints a token of its own for subscriber ``i`` instead (a connect-storm of strangers)."""
    subscribers: list[Subscriber] = field(default_factory=list)
    counters: Counters = field(default_factory=lambda: Counters(0))
    close_codes: Counter[int] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    subscribed: int = 0
    lost: int = 0
    controls: int = 0

    def __post_init__(self) -> None:
        self._shared_request = self._request(self.token)

    def request_for(self, sub_id: int) -> bytes:
        """The upgrade request of subscriber ``sub_id``."""
        return self._shared_request if self.mint is None else self._request(self.mint(sub_id))

    def _request(self, token: str | None) -> bytes:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        return wire.upgrade_request(self.endpoint.host_header, self.endpoint.path, headers)

    def begin(self, step: int) -> None:
        """Start counting a new step from zero."""
        self.counters = Counters(step)
        self.lost = 0
        self.close_codes.clear()
        for sub in self.subscribers:
            sub.last_seq = 0

    def per_channel(self, channels: int) -> list[int]:
        """How many subscribers each channel ``NAME.<i>`` has."""
        counts = [0] * channels
        for sub in self.subscribers:
            if sub.subscribed:
                counts[int(sub.channel.rsplit(".", 1)[1])] += 1
        return counts

    def close(self) -> None:
        for sub in self.subscribers:
            if sub.transport is not None:
                sub.transport.abort()


class Subscriber(asyncio.Protocol):
    """One WebSocket client subscribed to one channel."""

    __slots__ = (
        "audience",
        "channel",
        "last_seq",
        "open",
        "ready",
        "request",
        "rest",
        "sub_frame",
        "subscribed",
        "transport",
    )

    def __init__(self, audience: Audience, channel: str, sub_id: int) -> None:
        self.audience = audience
        self.channel = channel
        self.transport: asyncio.Transport | None = None
        self.open = False
        self.subscribed = False
        self.rest = b""
        self.last_seq = 0
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.request = audience.request_for(sub_id)
        op = {"op": "subscribe", "channel": channel, "id": sub_id}
        self.sub_frame = wire.client_frame(wire.OP_TEXT, orjson.dumps(op))

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.subscribed:
            self.audience.lost += 1
        self._fail("connection closed before subscribe ok")

    def data_received(self, data: bytes) -> None:
        if not self.open:
            data = self._handshake(data)
            if not data:
                return
        elif self.rest:
            data = self.rest + data
            self.rest = b""
        now = time_ns()
        c = self.audience.counters
        step = c.step_bytes
        search = MESSAGE_RE.search
        lat_append = c.latencies_us.append
        end_all = len(data)
        pos = 0
        while end_all - pos >= 2:
            b0 = data[pos]
            length = data[pos + 1]
            if length < 126:
                start = pos + 2
            elif length == 126:
                if end_all - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                start = pos + 4
            else:
                if end_all - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > end_all:
                break
            pos = end
            if b0 == 0x81:  # FIN + text: the hot path
                m = search(data, start, end)
                if m is None:
                    self._control(data[start:end])
                    continue
                r, s, t = m.groups()
                if r != step:
                    c.late += 1
                    continue
                seq = int(s)
                last = self.last_seq
                if seq <= last:
                    c.dups += 1
                    continue
                if seq != last + 1:
                    c.gaps += seq - last - 1
                self.last_seq = seq
                if not c.unique:
                    c.first_ns = now
                c.unique += 1
                c.last_ns = now
                lat_append((now - int(t)) // 1000)
            else:
                self._opcode(b0 & 0x0F, data[start:end])
        if pos < end_all:
            self.rest = data[pos:]

    # -- slow paths ---------------------------------------------------------------------

    def _handshake(self, data: bytes) -> bytes:
        """Consume the HTTP response; return bytes that follow it (frames), if any."""
        buf = self.rest + data
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0:
            self.rest = buf
            return b""
        status = buf[: buf.find(b"\r\n")].decode("latin-1")
        if not status.startswith("HTTP/1.1 101"):
            self._fail(f"upgrade refused: {status[9:]}")
            assert self.transport is not None
            self.transport.close()
            return b""
        self.open = True
        self.rest = b""
        assert self.transport is not None
        self.transport.write(self.sub_frame)
        return buf[head_end + 4 :]

    def _control(self, payload: bytes) -> None:
        """A text frame that is not a benchmark message: welcome, ok, error…"""
        self.audience.controls += 1
        try:
            frame = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        kind = frame.get("type") if isinstance(frame, dict) else None
        if kind == "ok" and frame.get("channel") == self.channel and not self.subscribed:
            self.subscribed = True
            self.audience.subscribed += 1
            if not self.ready.done():
                self.ready.set_result(None)
        elif kind == "error" and not self.subscribed:
            self._fail(f"subscribe error: {frame.get('code')}")

    def _opcode(self, opcode: int, payload: bytes) -> None:
        assert self.transport is not None
        if opcode == wire.OP_PING:
            self.transport.write(wire.client_frame(wire.OP_PONG, payload))
        elif opcode == wire.OP_CLOSE:
            self.audience.close_codes[wire.close_code(payload)] += 1
            self.transport.write(wire.client_frame(wire.OP_CLOSE, payload[:2]))
            self.transport.close()

    def fail(self, reason: str) -> None:
        """Count this subscriber as failed (once) for ``reason``."""
        self._fail(reason)

    def _fail(self, reason: str) -> None:
        if not self.ready.done():
            self.audience.failures[reason] += 1
            self.ready.set_exception(SubscribeFailed(reason))


async def connect_all(
    audience: Audience,
    count: int,
    channels: int,
    concurrency: int,
    name: str = "bench",
    on_progress: Callable[[], None] | None = None,
) -> float:
    """Open ``count`` subscribers (channel ``name.<index mod channels>``); return seconds.

    At most ``concurrency`` handshakes are in flight: a burst larger than the
    server's listen backlog would only measure SYN retransmission timers.
    """
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    endpoint = audience.endpoint

    async def one(i: int) -> None:
        async with gate:
            sub = Subscriber(audience, f"{name}.{i % channels}", i + 1)
            audience.subscribers.append(sub)
            try:
                await asyncio.wait_for(
                    loop.create_connection(
                        lambda: sub, endpoint.host, endpoint.port, ssl=endpoint.tls,
                        server_hostname=endpoint.host if endpoint.tls else None,
                    ),
                    10,
                )
                await asyncio.wait_for(asyncio.shield(sub.ready), 30)
            except SubscribeFailed:
                pass  # counted by _fail
            except (OSError, TimeoutError) as exc:
                sub.fail(str(exc) if isinstance(exc, ssl.SSLError) else type(exc).__name__)
                if sub.transport is not None:
                    sub.transport.abort()
            if sub.ready.done() and not sub.ready.cancelled():
                sub.ready.exception()  # mark retrieved

    async def progress() -> None:
        assert on_progress is not None
        while True:
            await asyncio.sleep(0.5)
            on_progress()

    ticker = asyncio.create_task(progress()) if on_progress else None
    started = time.perf_counter()
    try:
        await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        if ticker is not None:
            ticker.cancel()
    return time.perf_counter() - started


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an already sorted list (0 when empty)."""
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def step_report(c: Counters, cpu: float, wall: float) -> dict[str, Any]:
    """Summarise one step; sorting happens after the CPU snapshot was taken."""
    lat = sorted(c.latencies_us)
    span = (c.last_ns - c.first_ns) / 1e9
    return {
        "step": c.step,
        "unique": c.unique,
        "dups": c.dups,
        "gaps": c.gaps,
        "late": c.late,
        "first_ns": c.first_ns,
        "last_ns": c.last_ns,
        "delivery_span_s": span,
        "latency_us": {
            "p50": percentile(lat, 0.50),
            "p90": percentile(lat, 0.90),
            "p99": percentile(lat, 0.99),
            "max": lat[-1] if lat else 0,
            "mean": sum(lat) / len(lat) if lat else 0.0,
        },
        "cpu_s": cpu,
        "wall_s": wall,
        "cpu_fraction": cpu / wall if wall > 0 else 0.0,
    }
