"""The node's Redis subscriber reader alone: CPU µs per received pub/sub message.

```
python -m benchmarks.subscriber_read                       # a backlog of 200,000 messages, 3 rounds
python -m benchmarks.subscriber_read --rate 50000          # paced: ~50 messages per TCP read
python -m benchmarks.subscriber_read --messages 100000 --channels 1 --repeat 5
```

The harness (``python -m benchmarks``) measures the whole path, WebSockets
included; this isolates the first step of every delivery: reading a message off
the Redis subscriber connection and handing it to the hub. It starts a
throwaway ``redis-server`` (``processes.start_redis``), opens the real
:class:`~wsbroker.backplane.redis.RedisBackplane` with a handler that only
counts, subscribes ``--channels`` channels, and has a publisher process (this
module with ``--publisher``: raw pipelined RESP, every command built before the
clock starts) PUBLISH ``--messages`` ~100-byte messages round-robin over them.
``--rate 0`` (the default) measures a backlog: the reader's event loop is held
while the publisher runs, so Redis queues every message and each read of the
socket is full; that is the reader's own cost per message, whatever the speed
of Redis and the publisher. A rate sends one slice per millisecond, as a busy
backend would: fewer messages per read, so the per-read costs (event loop
wake-up, ``read_response``) weigh in.

The figure is this process's CPU time (``time.process_time``) per message,
counted from the release of the backlog (or the first message, at a rate) to
the last message, so the publisher's start and the subscribing are not billed.
Messages/s is over the same interval (at a rate it is that rate, if the reader
keeps up). The garbage collector is set as ``wsbroker serve`` sets it once
started (``--default-gc`` keeps Python's thresholds). Each round is printed;
the summary gives the best and the median.
By default this process runs on core 0 and redis-server and the publisher on
core 1, as in the harness; on a shared machine, alternate the versions compared
(A, B, A, B) rather than trusting one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import processes
from benchmarks.publisher import resp_publish
from wsbroker.backplane.redis import RedisBackplane
from wsbroker.bench.messages import message
from wsbroker.cli import GC_YOUNG_THRESHOLD
from wsbroker.config import Settings

PREFIX = "bench:"
CHANNEL_NAME = "c"


class Counter:
    """The engine's message handler: counts, and wakes the waiter at ``mark``."""

    def __init__(self) -> None:
        self.count = 0
        self.mark = 0
        self.reached = asyncio.Event()

    def on_message(self, channel: str, payload: bytes) -> None:
        self.count += 1
        if self.count == self.mark:
            self.reached.set()

    async def until(self, mark: int) -> None:
        """Return once ``mark`` messages are counted."""
        self.mark = mark
        if self.count < mark:
            await self.reached.wait()
        self.reached.clear()

    def on_state(self, up: bool) -> None:
        pass


def publish(port: int, messages: int, channels: int, rate: float) -> None:
    """The publisher process: build every PUBLISH, say ``ready``, await a line, send.

    Raw pipelined RESP on a blocking socket, the whole run built beforehand so
    that publishing flat out costs Redis's time only; a thread counts the
    replies (``:<n>``), and the process exits once all are in.
    """
    names = [f"{PREFIX}{CHANNEL_NAME}.{c}".encode() for c in range(channels)]
    blob = b"".join(resp_publish(names[i % channels], message(1, i // channels + 1, 100))
                    for i in range(messages))
    chunks: list[bytes] = []
    per_ms = max(1, round(rate / 1000)) if rate else 0
    if per_ms:  # one chunk per millisecond; every command is the same length
        size = len(blob) // messages * per_ms
        chunks = [blob[i:i + size] for i in range(0, len(blob), size)]
    with socket.create_connection(("127.0.0.1", port)) as sock:
        def count_replies() -> None:
            lines = 0
            while lines < messages and (data := sock.recv(1 << 16)):
                if data.startswith(b"-") or b"\r\n-" in data:
                    raise RuntimeError(f"Redis refused: {data[:200]!r}")
                lines += data.count(b"\n")
        replies = threading.Thread(target=count_replies, daemon=True)
        replies.start()
        print("ready", flush=True)
        sys.stdin.readline()
        if not per_ms:
            sock.sendall(blob)
        else:
            started = time.perf_counter()
            for n, chunk in enumerate(chunks):
                delay = started + n / 1000 - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                sock.sendall(chunk)
        replies.join()


async def one_round(engine: RedisBackplane, counter: Counter, port: int, *, messages: int,
                    channels: int, rate: float, load_cpu: int,
                    timeout: float) -> tuple[float, float]:
    """Publish ``messages``; return (CPU µs per message, messages/s) of this process.

    The publisher is driven with blocking calls on purpose: while this process
    waits for it, its event loop (so the reader) is stopped. With ``rate`` 0
    that is the whole publishing: Redis holds the backlog and the clocks start
    when the loop does. With a rate they start at the first message.
    """
    counter.count = 0
    cmd = processes.pinned(
        [processes.PYTHON, "-m", "benchmarks.subscriber_read", "--publisher", str(port),
         "--messages", str(messages), "--channels", str(channels), "--rate", str(rate)],
        load_cpu,
    )
    # Blocking on purpose (see above): subprocess.Popen, not asyncio's.
    publisher = subprocess.Popen(  # noqa: ASYNC220
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=processes.REPO)
    assert publisher.stdin is not None and publisher.stdout is not None
    try:
        if publisher.stdout.readline() != b"ready\n":
            raise RuntimeError("the publisher did not start")
        gc.collect()
        publisher.stdin.write(b"go\n")
        publisher.stdin.close()
        async with asyncio.timeout(timeout):
            if not rate:
                publisher.wait(timeout)  # Redis has it all; the reader has read nothing
            else:
                await counter.until(1)
            first = counter.count
            cpu0, wall0 = time.process_time(), time.perf_counter()
            await counter.until(messages)
            cpu1, wall1 = time.process_time(), time.perf_counter()
        if publisher.wait(timeout):
            raise RuntimeError(f"the publisher failed with {publisher.returncode}")
    finally:
        if publisher.poll() is None:
            publisher.kill()  # our own child, by its PID
            publisher.wait()
    counted = messages - first
    return (cpu1 - cpu0) / counted * 1e6, counted / (wall1 - wall0)


async def run(args: argparse.Namespace) -> list[tuple[float, float]]:
    with tempfile.TemporaryDirectory(prefix="wsb-subread-") as tmp:
        redis, port = processes.start_redis(Path(tmp), args.load_cpu)
        try:
            engine = RedisBackplane(Settings(redis_url=f"redis://127.0.0.1:{port}/0",
                                             redis_prefix=PREFIX, node_id="subread"))
            counter = Counter()
            engine.bind(counter.on_message, counter.on_state)
            await engine.start()
            try:
                if not engine.is_up:
                    raise RuntimeError("cannot connect to the benchmark's redis-server")
                for start in range(0, args.channels, 100):
                    await asyncio.gather(*(engine.subscribe(f"{CHANNEL_NAME}.{c}") for c in
                                           range(start, min(start + 100, args.channels))))
                if not args.default_gc:  # as `wsbroker serve` once started
                    gc.freeze()
                    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
                results = []
                for step in range(args.repeat + 1):
                    # Round 0 warms up (first-call costs, allocator), unreported.
                    result = await one_round(
                        engine, counter, port, messages=args.messages if step else 20_000,
                        channels=args.channels, rate=args.rate, load_cpu=args.load_cpu,
                        timeout=args.timeout)
                    if step:
                        results.append(result)
                        print(f"round {step}: {result[0]:.2f} µs CPU/message, "
                              f"{result[1]:,.0f} messages/s", flush=True)
                return results
            finally:
                await engine.stop()
        finally:
            redis.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.subscriber_read", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=200_000)
    p.add_argument("--channels", type=int, default=1000)
    p.add_argument("--rate", type=float, default=0.0,
                   help="messages per second, all channels; 0: as fast as possible")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--reader-cpu", type=int, default=0,
                   help="core of this (the reading) process; -1: not pinned")
    p.add_argument("--load-cpu", type=int, default=1,
                   help="core of redis-server and the publisher")
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop",
                   help="event loop (uvloop, as `wsbroker serve`, when installed)")
    p.add_argument("--default-gc", action="store_true",
                   help="keep Python's GC thresholds (the node raises the young one)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per round, at most")
    p.add_argument("--publisher", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.publisher:
        publish(args.publisher, args.messages, args.channels, args.rate)
        return
    if args.reader_cpu >= 0 and args.reader_cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {args.reader_cpu})
    loop_factory = None
    if args.loop == "uvloop":
        with contextlib.suppress(ImportError):
            import uvloop

            loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        results = runner.run(run(args))
    cpu = [r[0] for r in results]
    rates = [r[1] for r in results]
    print(f"{args.messages:,} messages over {args.channels:,} channels, "
          f"{'backlog' if not args.rate else f'{args.rate:,.0f}/s'}, "
          f"{'uvloop' if loop_factory else 'asyncio'}: CPU µs/message best {min(cpu):.2f}, "
          f"median {statistics.median(cpu):.2f}; messages/s best {max(rates):,.0f}, "
          f"median {statistics.median(rates):,.0f}")


if __name__ == "__main__":
    main()
