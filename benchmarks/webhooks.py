"""Webhook throughput and memory: events/s a node delivers to a local receiver.

    .venv/bin/python -m benchmarks.webhooks                    # 1,000 events/s for 30 s
    .venv/bin/python -m benchmarks.webhooks --rate 2000 --duration 20
    .venv/bin/python -m benchmarks.webhooks --receiver hang    # a receiver that never answers

A real ``wsbroker serve`` (pinned to core 0, in-process backplane, webhooks on
with ``client_publish``) gets publishes from one WebSocket client at a fixed
rate; each publish becomes one webhook event. The receiver (aiohttp, in this
process, on core 1) checks every request's signature with
``wsbroker.webhooks.verify`` and counts events and their latency (event
``time_ms`` → arrival). The node's RSS is sampled each second: with a healthy
receiver it should stay flat; with ``--receiver hang`` pending events stop at
``--queue`` and the rest are dropped and counted, so memory still plateaus.
Stops by itself; every process it starts is stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import jwt
import orjson
from aiohttp import web
from websockets.asyncio.client import connect

from benchmarks.processes import PYTHON, free_port, rss_kib, start, wait_port
from wsbroker.webhooks import verify

JWT_SECRET = "bench-secret-with-enough-entropy-0123456789"
HOOK_SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


class Receiver:
    def __init__(self, hang: bool) -> None:
        self.hang = hang
        self.events = 0
        self.requests = 0
        self.bad = 0
        self.latencies: list[float] = []
        self.release = asyncio.Event()
        self.wanted = sys.maxsize
        self.caught_up = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests += 1
        try:
            verify(HOOK_SECRET, request.headers, body)
        except ValueError:
            self.bad += 1
        now = time.time() * 1000
        events = orjson.loads(body)["events"]
        self.events += len(events)
        self.latencies.extend(now - event["time_ms"] for event in events)
        if self.events >= self.wanted:
            self.caught_up.set()
        if self.hang:
            await self.release.wait()
        return web.Response(status=204)


def metric_lines(port: int, prefix: str) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text: str = response.read().decode()
    return [line for line in text.splitlines() if line.startswith(prefix)]


async def publish_at(url: str, rate: int, duration: float) -> int:
    token = jwt.encode({"sub": "bench", "exp": int(time.time()) + 3600, "channels": [">"],
                        "publish": [">"]}, JWT_SECRET, algorithm="HS256")
    sent = 0
    async with connect(f"{url}?token={token}", max_queue=None) as ws:
        await ws.recv()  # welcome

        async def drain_replies() -> None:
            async for _ in ws:
                pass

        reader = asyncio.create_task(drain_replies())
        loop = asyncio.get_running_loop()
        started = loop.time()
        tick = 0.01
        total = int(duration * rate)
        while sent < total:
            due = min(int((loop.time() - started) * rate) + 1, total)
            while sent < due:
                await ws.send(orjson.dumps({"op": "publish", "channel": "bench.hooks",
                                            "data": {"seq": sent}}).decode())
                sent += 1
            await asyncio.sleep(tick)
        reader.cancel()
    return sent


async def run(args: argparse.Namespace) -> dict[str, Any]:
    receiver = Receiver(args.receiver == "hang")
    app = web.Application()
    app.router.add_post("/hooks", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    hook_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", hook_port).start()
    port = free_port()
    logdir = Path(tempfile.mkdtemp(prefix="wsb-bench-webhooks-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSB_")}
    node = start("wsbroker", [
        PYTHON, "-m", "wsbroker", "serve", "--port", str(port), "--jwt-secret", JWT_SECRET,
        "--rate-limit", "0", "--log-level", "warning",
        "--webhook-url", f"http://127.0.0.1:{hook_port}/hooks",
        "--webhook-secret", HOOK_SECRET, "--webhook-events", "client_publish",
        "--webhook-queue", str(args.queue),
    ], cpu=0, logdir=logdir, env=env)
    rss: list[int] = []
    try:
        wait_port(port, 15, node.proc)
        rss.append(rss_kib(node.pid))

        async def sample() -> None:
            while True:
                await asyncio.sleep(1)
                rss.append(rss_kib(node.pid))
                print(f"\r{len(rss) - 1:>4}s  delivered {receiver.events:>8}  "
                      f"rss {rss[-1] / 1024:6.1f} MiB", end="", file=sys.stderr, flush=True)

        sampler = asyncio.create_task(sample())
        started = time.monotonic()
        sent = await publish_at(f"ws://127.0.0.1:{port}/ws", args.rate, args.duration)
        receiver.wanted = sent
        if receiver.events >= sent:
            receiver.caught_up.set()
        if not receiver.hang:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(receiver.caught_up.wait(), 10)
        elapsed = time.monotonic() - started
        sampler.cancel()
        print(file=sys.stderr)
        dropped = metric_lines(port, "wsbroker_webhook_events_dropped_total")
        requests = metric_lines(port, "wsbroker_webhook_requests_total")
    finally:
        receiver.release.set()
        node.stop()
        await runner.cleanup()
    latencies = sorted(receiver.latencies) or [0.0]
    return {
        "rate": args.rate, "duration_s": args.duration, "receiver": args.receiver,
        "events_sent": sent, "events_delivered": receiver.events,
        "delivered_per_s": round(receiver.events / elapsed, 1),
        "requests": receiver.requests,
        "events_per_request": round(receiver.events / max(receiver.requests, 1), 1),
        "bad_signatures": receiver.bad,
        "latency_ms": {"p50": round(latencies[len(latencies) // 2], 1),
                       "p99": round(latencies[int(len(latencies) * 0.99)], 1),
                       "max": round(latencies[-1], 1),
                       "mean": round(statistics.fmean(latencies), 1)},
        "node_rss_mib": {"start": round(rss[0] / 1024, 1),
                         "max": round(max(rss) / 1024, 1),
                         "end": round(rss[-1] / 1024, 1)},
        "node_metrics": dropped + requests,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.webhooks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=1000, help="events per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--receiver", choices=("ok", "hang"), default="ok")
    parser.add_argument("--queue", type=int, default=10_000, help="--webhook-queue")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    if args.json:
        print(orjson.dumps(result).decode())
        return
    for key, value in result.items():
        if isinstance(value, list):
            print(f"{key}:")
            for line in value:
                print(f"  {line}")
        else:
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
