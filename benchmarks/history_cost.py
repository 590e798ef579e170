"""What history costs (SPEC §7): Redis round trips per publish, and ``history`` op latency.

```
python -m benchmarks.history_cost                 # 1,000 entries of ~100 bytes, 200 reads
python -m benchmarks.history_cost --entries 1000 --reads 500 --size 500
```

It starts a throwaway ``redis-server`` (core 1) and one ``wsbroker serve
--history`` process (core 0), then, through a real WebSocket client:

1. **Round trips per publish.** ``CONFIG RESETSTAT``, N client ``publish`` ops
   on a history channel, then ``INFO commandstats``: every command Redis ran
   for them. One ``fcall`` per publish (and nothing else) means one round trip;
   the same for N publishes on a plain channel (one ``publish`` each).
2. **Publish ``ok`` latency**, history channel against plain channel: the
   client sends one op and waits for its reply, N times.
3. **``history`` op latency** with ``limit`` 1,000 on a channel holding
   ``--entries`` messages: p50/p90/p99/max over ``--reads`` ops, measured at
   the client (so it includes the WebSocket round trip and JSON parsing).

Prints a small report and one JSON line. Bounded: it stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jwt
import orjson
import redis
from websockets.asyncio.client import connect

from benchmarks import processes

SERVER_CPU = 0
LOAD_CPU = 1


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": statistics.median(values), "p90": percentile(values, 0.9),
            "p99": percentile(values, 0.99), "max": max(values)}


def commandstats(client: redis.Redis) -> dict[str, int]:
    """Calls per command since the last CONFIG RESETSTAT (``INFO`` itself left out)."""
    stats: dict[str, Any] = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in stats.items()
            if name not in ("cmdstat_info", "cmdstat_config")}


async def measure(args: argparse.Namespace, port: int, redis_port: int,
                  secret: str) -> dict[str, Any]:
    token = jwt.encode({"sub": "bench", "exp": int(time.time()) + 3600, "channels": [">"],
                        "publish": [">"]}, secret, algorithm="HS256")
    data = {"p": "x" * max(0, args.size - 8)}
    backend = redis.Redis(port=redis_port)
    async with connect(f"ws://127.0.0.1:{port}/ws?token={token}", compression=None,
                       max_size=None) as ws:
        await ws.recv()  # welcome
        next_id = 0

        async def request(op: str, **fields: Any) -> tuple[dict[str, Any], float]:
            nonlocal next_id
            next_id += 1
            started = time.perf_counter()
            await ws.send(orjson.dumps({"op": op, "id": next_id, **fields}).decode())
            while True:
                reply: dict[str, Any] = orjson.loads(await ws.recv())
                if reply.get("id") == next_id:
                    if reply["type"] != "ok":
                        raise RuntimeError(f"{op} failed: {reply}")
                    return reply, (time.perf_counter() - started) * 1000

        results: dict[str, Any] = {}
        for label, channel in (("history", "hist.cost"), ("plain", "plain.cost")):
            await request("publish", channel=channel, data=data)  # warm up
            backend.config_resetstat()
            latencies = [(await request("publish", channel=channel, data=data))[1]
                         for _ in range(args.publishes)]
            results[f"publish_{label}"] = {"ok_ms": summary(latencies),
                                           "redis_commands": commandstats(backend)}
        for _ in range(args.entries):
            await request("publish", channel="hist.read", data=data)
        reads = []
        for _ in range(args.reads):
            reply, elapsed = await request("history", channel="hist.read", limit=1000)
            reads.append(elapsed)
        results["history_op"] = {"messages": len(reply["messages"]), "ms": summary(reads)}
    backend.close()
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.history_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entries", type=int, default=1000, help="messages kept on the read channel")
    p.add_argument("--reads", type=int, default=200, help="history ops (limit 1000) to time")
    p.add_argument("--publishes", type=int, default=500, help="publish ops per channel kind")
    p.add_argument("--size", type=int, default=100, help="approximate bytes of data per message")
    args = p.parse_args(argv)
    secret = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory(prefix="wsb-history-cost-") as tmp:
        logdir = Path(tmp)
        redis_proc, redis_port = processes.start_redis(logdir, LOAD_CPU)
        port = processes.free_port()
        server = processes.start("wsbroker", [
            processes.PYTHON, "-m", "wsbroker", "serve", "--port", str(port),
            "--redis-url", f"redis://127.0.0.1:{redis_port}", "--jwt-secret", secret,
            "--rate-limit", "0", "--history", "hist.>=1000", "--log-level", "warning",
        ], SERVER_CPU, logdir)
        try:
            processes.wait_port(port, 20, server.proc)
            results = asyncio.run(asyncio.wait_for(measure(args, port, redis_port, secret),
                                                   300))
        finally:
            server.stop()
            redis_proc.stop()
    for label in ("history", "plain"):
        entry = results[f"publish_{label}"]
        ok = entry["ok_ms"]
        print(f"publish on a {label} channel: {args.publishes} ops, Redis ran "
              f"{entry['redis_commands']}; ok p50 {ok['p50']:.3f} ms, p99 {ok['p99']:.3f} ms")
    read = results["history_op"]
    ms = read["ms"]
    print(f"history op, limit 1000 ({read['messages']} messages of ~{args.size} B): "
          f"p50 {ms['p50']:.2f} ms, p90 {ms['p90']:.2f} ms, p99 {ms['p99']:.2f} ms, "
          f"max {ms['max']:.2f} ms over {args.reads} reads")
    sys.stdout.write(orjson.dumps(results).decode() + "\n")


if __name__ == "__main__":
    main()
