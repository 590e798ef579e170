"""Throughput of ``POST /api/publish`` with keep-alive: a node on core 0, the load on core 1.

::

    .venv/bin/python -m benchmarks.api_publish                 # memory engine, 10 s
    .venv/bin/python -m benchmarks.api_publish --redis         # Redis backplane (redis on core 1)
    .venv/bin/python -m benchmarks.api_publish --connections 32 --duration 20 --json

The node is a real ``wsbroker serve --api-port`` process pinned with
``taskset -c 0``. The generator (this process, pinned to core 1) keeps
``--connections`` keep-alive connections, each with exactly one request in
flight (no pipelining: a backend's HTTP client does not pipeline), and counts
the 200 answers in the measured window after a warm-up. It also reads the
node's CPU time: requests per node CPU-second is what a core given wholly to
the node sustains, a figure that other load on a shared machine does not bend. It is a bare asyncio
``Protocol`` on uvloop that writes one prebuilt request and reads each answer's
status line and ``Content-Length``, so that the generator is not what is
measured. The channel has no subscribers: this measures the API and the
publish path, not fan-out (which ``python -m benchmarks`` measures).

It stops by itself after ``--warmup`` + ``--duration`` seconds and ends only
the processes it started.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import orjson

from benchmarks.processes import (
    PYTHON,
    Managed,
    cpu_seconds,
    free_port,
    pinned,
    start,
    start_redis,
    wait_port,
)

HEAD_END = b"\r\n\r\n"
LENGTH_RE = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


class Connection(asyncio.Protocol):
    """One keep-alive connection: send, wait for the answer, send again."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.buffer = b""
        self.sent_at = 0.0
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.send()

    def send(self) -> None:
        assert self.transport is not None
        if self.bench.stopping:
            self.transport.close()
            return
        self.sent_at = time.perf_counter()
        self.transport.write(self.bench.request)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        while True:
            end = buffer.find(HEAD_END)
            if end < 0:
                break
            match = LENGTH_RE.search(buffer, 0, end + 2)
            length = int(match.group(1)) if match else 0
            total = end + 4 + length
            if len(buffer) < total:
                break
            self.bench.answered(buffer[9:12], time.perf_counter() - self.sent_at)
            buffer = buffer[total:]
            self.send()
        self.buffer = buffer

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


class Bench:
    """Counts answers; only those inside the measured window go in the figures."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.measuring = False
        self.stopping = False
        self.ok = 0
        self.other: dict[str, int] = {}
        self.latencies: list[float] = []

    def answered(self, status: bytes, latency: float) -> None:
        if not self.measuring:
            return
        if status == b"200":
            self.ok += 1
            if self.ok % 16 == 0:  # a sample is enough for percentiles
                self.latencies.append(latency)
        else:
            key = status.decode(errors="replace")
            self.other[key] = self.other.get(key, 0) + 1


def build_request(port: int, key: str, channel: str, size: int) -> bytes:
    body = orjson.dumps({"channel": channel, "data": {"p": "x" * max(size - 30, 0)}})
    return (
        f"POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def run(args: argparse.Namespace, api_port: int, key: str, node_pid: int) -> dict[str, Any]:
    channel = "bench.api"
    bench = Bench(build_request(api_port, key, channel, args.message_size))
    loop = asyncio.get_running_loop()
    connections = []
    for _ in range(args.connections):
        _, protocol = await loop.create_connection(lambda: Connection(bench), "127.0.0.1",
                                                   api_port)
        connections.append(protocol)
    await asyncio.sleep(args.warmup)
    bench.measuring = True
    started = time.perf_counter()
    cpu_before = os.times()
    node_cpu_before = cpu_seconds(node_pid)
    await asyncio.sleep(args.duration)
    bench.measuring = False
    elapsed = time.perf_counter() - started
    cpu_after = os.times()
    node_cpu = cpu_seconds(node_pid) - node_cpu_before
    bench.stopping = True
    await asyncio.wait([c.lost for c in connections], timeout=5)
    latencies = sorted(bench.latencies) or [0.0]
    return {
        "requests_per_s": round(bench.ok / elapsed),
        # Load-independent: what one core given wholly to the node would sustain.
        "requests_per_node_cpu_s": round(bench.ok / node_cpu) if node_cpu > 0 else None,
        "node_cpu_share": round(node_cpu / elapsed, 2),
        "ok": bench.ok,
        "errors": bench.other,
        "seconds": round(elapsed, 2),
        "connections": args.connections,
        "backplane": "redis" if args.redis else "memory",
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1 if len(latencies) > 1 else 0]
                        * 1000, 2),
        "generator_cpu_s": round((cpu_after.user + cpu_after.system)
                                 - (cpu_before.user + cpu_before.system), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--message-size", type=int, default=100)
    parser.add_argument("--redis", action="store_true", help="Redis backplane (else memory)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) > 1 and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})  # the generator (and redis) on core 1
    key, secret = secrets.token_hex(16), secrets.token_hex(32)  # the node needs a JWT key
    api_port, ws_port = free_port(), free_port()
    processes: list[Managed] = []
    with tempfile.TemporaryDirectory(prefix="wsb-api-bench-") as tmp:
        logdir = Path(tmp)
        try:
            cmd = [PYTHON, "-m", "wsbroker", "serve", "--port", str(ws_port),
                   "--api-port", str(api_port), "--log-level", "warning",
                   "--rate-limit", "0"]
            if args.redis:
                redis, redis_port = start_redis(logdir, cpu=1)
                processes.append(redis)
                cmd += ["--redis-url", f"redis://127.0.0.1:{redis_port}/0"]
            env = {k: v for k, v in os.environ.items() if not k.startswith("WSB_")}
            env.update(WSB_API_KEY=key, WSB_JWT_SECRET=secret)
            node = start("wsbroker-api", cmd, cpu=0, logdir=logdir, env=env)
            processes.append(node)
            wait_port(api_port, 15, node.proc)
            try:
                import uvloop

                result = uvloop.run(run(args, api_port, key, node.pid))
            except ImportError:
                result = asyncio.run(run(args, api_port, key, node.pid))
            result["command"] = " ".join(pinned(cmd, 0))
        finally:
            for process in reversed(processes):
                process.stop()
    if args.json:
        print(orjson.dumps(result).decode())
    else:
        print(f"POST /api/publish, keep-alive, {result['connections']} connections, "
              f"{result['backplane']} backplane: "
              f"{result['requests_per_s']:,} requests/s over {result['seconds']} s, the node "
              f"using {result['node_cpu_share']:.0%} of its core: "
              f"{result['requests_per_node_cpu_s'] or 0:,} requests per node CPU-second "
              f"(p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms; "
              f"non-200: {result['errors'] or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
