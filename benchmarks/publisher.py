"""Publisher: PUBLISH benchmark messages through Redis at a fixed rate for a fixed time.

This is the "backend service" of the SPEC (§6: ``PUBLISH ws:<channel> <json>``).
Why raw RESP on an asyncio stream rather than redis-py: it shares core 1 with the
load generator and redis-server, so a publish should cost about a microsecond of
Python, not a pipeline object. Messages go round-robin over ``NAME.0`` …
``NAME.<channels-1>``; the sequence number ``s`` counts per channel from 1, so
message ``i`` is number ``i // channels + 1`` on channel ``i % channels``.
Prints one JSON line: how many were sent and acknowledged, and the achieved rate.
With ``--history-size N`` each message is ``FCALL wsb_publish`` instead, as a
backend records history (SPEC §7): one round trip, appended and published by Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time

import orjson

from wsbroker.bench.messages import message


def resp_publish(channel: bytes, payload: bytes) -> bytes:
    """The RESP encoding of ``PUBLISH channel payload``."""
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(channel),
        channel,
        len(payload),
        payload,
    )


def resp_fcall(channel: bytes, payload: bytes, size: bytes) -> bytes:
    """The RESP encoding of ``FCALL wsb_publish 2 {channel}:s {channel}:m payload size 0``."""
    args = [b"FCALL", b"wsb_publish", b"2", b"{" + channel + b"}:s", b"{" + channel + b"}:m",
            payload, size, b"0"]
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


async def publish(args: argparse.Namespace) -> dict[str, float | int]:
    reader, writer = await asyncio.open_connection(args.host, args.port)
    total = round(args.rate * args.duration)
    acked = 0
    lines_per_reply = 4 if args.history_size else 1  # *2, :offset, $len, epoch
    all_acked = asyncio.Event()
    if total == 0:
        all_acked.set()

    async def count_replies() -> None:
        nonlocal acked
        lines = 0
        while chunk := await reader.read(1 << 16):
            lines += chunk.count(b"\n")  # each PUBLISH reply is ":<n>\r\n"
            if chunk.startswith(b"-") or b"\r\n-" in chunk:
                raise RuntimeError(f"Redis refused: {chunk[:200]!r}")
            acked = lines // lines_per_reply
            if acked >= total:
                all_acked.set()
        all_acked.set()  # Redis went away: nothing more will be acknowledged

    counter = asyncio.create_task(count_replies())
    names = [f"{args.prefix}{args.channel_name}.{c}".encode() for c in range(args.channels)]
    channels, rate, size, step = args.channels, args.rate, args.size, args.step
    keep = str(args.history_size).encode()

    def encode(channel: bytes, payload: bytes) -> bytes:
        if args.history_size:
            return resp_fcall(channel, payload, keep)
        return resp_publish(channel, payload)
    sent = 0
    cpu0 = os.times()
    t0 = time.perf_counter()
    while sent < total and not counter.done():
        due = min(total, int((time.perf_counter() - t0) * rate) + 1)
        if due > sent:
            writer.write(
                b"".join(
                    encode(names[i % channels], message(step, i // channels + 1, size))
                    for i in range(sent, due)
                )
            )
            sent = due
        await asyncio.sleep(max(0.001, t0 + sent / rate - time.perf_counter()))
    elapsed = time.perf_counter() - t0
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_acked.wait(), 10)
    cpu1 = os.times()
    counter.cancel()
    writer.close()
    return {
        "sent": sent,
        "acked": acked,
        "elapsed_s": elapsed,
        "achieved_rate": sent / elapsed if elapsed > 0 else 0.0,
        "cpu_s": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.publisher", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="redis-server port")
    p.add_argument("--prefix", default="ws:")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--channel-name", default="bench", help="channels are NAME.0 … NAME.<n-1>")
    p.add_argument("--rate", type=float, required=True, help="messages per second, all channels")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--step", type=int, required=True, help="step id stamped into each message")
    p.add_argument("--size", type=int, default=100, help="payload bytes")
    p.add_argument("--history-size", type=int, default=0,
                   help="publish with FCALL wsb_publish, keeping this many messages")
    result = asyncio.run(publish(p.parse_args(argv)))
    sys.stdout.buffer.write(orjson.dumps(result) + b"\n")


if __name__ == "__main__":
    main()
