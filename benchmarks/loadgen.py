"""Load generator: thousands of raw WebSocket subscribers in one process on one core.

Why it looks like this: to measure the server, the generator must never be the
bottleneck. So each subscriber is a bare ``asyncio.Protocol`` (on uvloop when
available) that does the HTTP upgrade and frame parsing itself; per delivery it
does one regex search and a few integer operations, and it reads the clock once
per received chunk rather than once per frame.

It is driven by the harness over pipes, one JSON object per line:
stdout carries events (``progress``, ``ready``, ``begun``, ``stats``, ``end``,
``bye``); stdin carries commands (``begin``/``stats``/``end``/``quit``).

Each published message carries ``"r"`` (the step id), ``"s"`` (a per-channel
sequence number starting at 1 each step) and ``"t"`` (``time.time_ns()`` at
publish), which is how latency, loss, duplicates and stragglers are detected.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import resource
import sys
import time
from array import array
from collections import Counter
from typing import Any, cast

import jwt
import orjson

from benchmarks import frames

MESSAGE_RE = re.compile(rb'"r":\s*(\d+),\s*"s":\s*(\d+),\s*"t":\s*(\d+)')
time_ns = time.time_ns


def emit(event: str, **fields: Any) -> None:
    """Write one event line for the harness."""
    sys.stdout.buffer.write(orjson.dumps({"event": event, **fields}) + b"\n")
    sys.stdout.buffer.flush()


def cpu_seconds() -> float:
    """User + system CPU time of this process."""
    t = os.times()
    return t.user + t.system


def raise_fd_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


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


class Generator:
    """The whole client population plus what the harness asked to measure."""

    def __init__(self, host: str, port: int, path: str, token_secret: str | None = None) -> None:
        self.host = host
        self.port = port
        self.request = frames.upgrade_request(host, port, path)
        self.token_secret = token_secret
        self.subscribers: list[Subscriber] = []
        self.counters = Counters(0)
        self.close_codes: Counter[int] = Counter()
        self.failures: Counter[str] = Counter()
        self.subscribed = 0
        self.lost = 0
        self.controls = 0


    def request_for(self, sub_id: int) -> bytes:
        """The upgrade request: shared, or with a token of its own (``--token-secret``)."""
        if self.token_secret is None:
            return self.request
        claims = {"sub": f"bench-{sub_id}", "exp": int(time.time()) + 3600, "channels": [">"]}
        token = jwt.encode(claims, self.token_secret, algorithm="HS256")
        return frames.upgrade_request(self.host, self.port, f"/ws?token={token}")


class Subscriber(asyncio.Protocol):
    """One WebSocket client subscribed to one channel."""

    __slots__ = (
        "channel",
        "gen",
        "last_seq",
        "open",
        "ready",
        "request",
        "rest",
        "sub_frame",
        "subscribed",
        "transport",
    )

    def __init__(self, gen: Generator, channel: str, sub_id: int) -> None:
        self.gen = gen
        self.channel = channel
        self.transport: asyncio.Transport | None = None
        self.open = False
        self.subscribed = False
        self.rest = b""
        self.last_seq = 0
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.request = gen.request_for(sub_id)
        op = {"op": "subscribe", "channel": channel, "id": sub_id}
        self.sub_frame = frames.client_frame(frames.OP_TEXT, orjson.dumps(op))

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.subscribed:
            self.gen.lost += 1
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
        c = self.gen.counters
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
        self.gen.controls += 1
        try:
            frame = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        kind = frame.get("type") if isinstance(frame, dict) else None
        if kind == "ok" and frame.get("channel") == self.channel and not self.subscribed:
            self.subscribed = True
            self.gen.subscribed += 1
            if not self.ready.done():
                self.ready.set_result(None)
        elif kind == "error" and not self.subscribed:
            self._fail(f"subscribe error: {frame.get('code')}")

    def _opcode(self, opcode: int, payload: bytes) -> None:
        assert self.transport is not None
        if opcode == frames.OP_PING:
            self.transport.write(frames.client_frame(frames.OP_PONG, payload))
        elif opcode == frames.OP_CLOSE:
            self.gen.close_codes[frames.close_code(payload)] += 1
            self.transport.write(frames.client_frame(frames.OP_CLOSE, payload[:2]))
            self.transport.close()

    def _fail(self, reason: str) -> None:
        if not self.ready.done():
            self.gen.failures[reason] += 1
            self.ready.set_exception(SubscribeFailed(reason))


async def connect_all(
    gen: Generator, count: int, channels: int, concurrency: int, name: str = "bench"
) -> float:
    """Open ``count`` subscribers (channel ``name.<index mod channels>``); return seconds.

    At most ``concurrency`` handshakes are in flight: a burst larger than the
    server's listen backlog would only measure SYN retransmission timers.
    """
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            sub = Subscriber(gen, f"{name}.{i % channels}", i + 1)
            gen.subscribers.append(sub)
            try:
                await asyncio.wait_for(loop.create_connection(lambda: sub, gen.host, gen.port), 10)
                await asyncio.wait_for(asyncio.shield(sub.ready), 30)
            except SubscribeFailed:
                pass  # counted by _fail
            except (OSError, TimeoutError) as exc:
                sub._fail(type(exc).__name__)
                if sub.transport is not None:
                    sub.transport.abort()
            if sub.ready.done() and not sub.ready.cancelled():
                sub.ready.exception()  # mark retrieved

    async def progress() -> None:
        while True:
            await asyncio.sleep(0.5)
            emit("progress", subscribed=gen.subscribed, failed=sum(gen.failures.values()))

    ticker = asyncio.create_task(progress())
    started = time.perf_counter()
    try:
        await asyncio.gather(*(one(i) for i in range(count)))
    finally:
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
            "p99": percentile(lat, 0.99),
            "max": lat[-1] if lat else 0,
            "mean": sum(lat) / len(lat) if lat else 0.0,
        },
        "cpu_s": cpu,
        "wall_s": wall,
        "cpu_fraction": cpu / wall if wall > 0 else 0.0,
    }


async def command_loop(gen: Generator) -> None:
    """Serve the harness's commands until ``quit`` or end of input."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    while line := await reader.readline():
        cmd = orjson.loads(line)
        name = cmd.get("cmd")
        if name == "begin":
            gen.counters = Counters(int(cmd["step"]))
            gen.lost = 0  # connections lost and close codes are reported per step
            gen.close_codes.clear()
            for sub in gen.subscribers:
                sub.last_seq = 0
            cpu0, wall0 = cpu_seconds(), time.perf_counter()
            emit("begun", step=gen.counters.step)
        elif name == "stats":
            c = gen.counters
            emit("stats", unique=c.unique, late=c.late, dups=c.dups, lost=gen.lost)
        elif name == "end":
            cpu, wall = cpu_seconds() - cpu0, time.perf_counter() - wall0
            emit(
                "end",
                **step_report(gen.counters, cpu, wall),
                lost=gen.lost,
                close_codes={str(k): v for k, v in gen.close_codes.items()},
            )
        elif name == "quit":
            break
    for sub in gen.subscribers:
        if sub.transport is not None:
            sub.transport.abort()
    emit("bye")


async def amain(args: argparse.Namespace) -> None:
    gen = Generator(args.host, args.port, args.path, args.token_secret)
    cpu0 = cpu_seconds()
    seconds = await connect_all(
        gen, args.subscribers, args.channels, args.concurrency, args.channel_name
    )
    per_channel = [0] * args.channels
    for sub in gen.subscribers:
        if sub.subscribed:
            per_channel[int(sub.channel.rsplit(".", 1)[1])] += 1
    gc.collect()
    gc.freeze()  # the connection objects are permanent: keep them out of GC passes
    emit(
        "ready",
        subscribed=gen.subscribed,
        failed=sum(gen.failures.values()),
        failures=dict(gen.failures.most_common(5)),
        connect_s=seconds,
        connect_cpu_s=cpu_seconds() - cpu0,
        per_channel=per_channel,
    )
    await command_loop(gen)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/ws", help="request target, token query included")
    p.add_argument("--subscribers", type=int, default=1000)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--channel-name", default="bench", help="channels are NAME.0 … NAME.<n-1>")
    p.add_argument("--concurrency", type=int, default=100, help="handshakes in flight")
    p.add_argument("--token-secret", default=None,
                   help="mint a distinct HS256 token per subscriber with this secret")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    raise_fd_limit()
    try:
        import uvloop
    except ImportError:
        asyncio.run(amain(args))
    else:
        uvloop.run(amain(args))


if __name__ == "__main__":
    main()
