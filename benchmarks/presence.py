"""Presence at scale: one channel, thousands of members, two nodes, one Redis.

``python -m benchmarks.presence`` (defaults: 10,000 members over 2 nodes) starts a
throwaway ``redis-server`` and two ``wsbroker serve`` processes (core 0; this
harness, its raw-socket members and Redis on core 1), then measures:

1. **Queries**: the round trip of ``presence_stats`` and ``presence`` over a
   WebSocket, on each node, while every member is connected (targets: under
   10 ms and under 100 ms for 10,000 members).
2. **Redis cost per member**: ``MEMORY USAGE`` of the channel's three keys per
   member, and the script calls the nodes make (joins, refreshes) from
   ``INFO commandstats``, idle refresh traffic included.
3. **Join/leave fan-out**: one client joins and leaves a ``--join-leave``
   channel repeatedly while N raw subscribers listen on both nodes; reported
   as the nodes' fan-out time per event (``wsbroker_fanout_seconds``) and
   their CPU per event, and the wall time until every subscriber had every frame.

Members are the load generator's raw ``asyncio.Protocol`` subscribers
(``wsbroker.bench.subscribers``), each with a token of its own: ``sub`` is
``bench-<i>`` on both nodes, so 10,000 members are 5,000 distinct users.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import secrets
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jwt
import orjson
import redis
from websockets.asyncio.client import ClientConnection, connect

from benchmarks import loadgen, processes
from wsbroker.bench.subscribers import Audience, Endpoint, connect_all
from wsbroker.config import Settings
from wsbroker.presence import Member
from wsbroker.presence.redis import RedisPresenceStore

SERVER_CPU = 0
LOAD_CPU = 1
ROOM = "bench.room.0"
JL_NAME = "bench.jl"
JL_ROOM = "bench.jl.0"



def audience(port: int, secret: str) -> Audience:
    """Raw subscribers for one node, each with a token of its own."""
    return Audience(Endpoint.from_url(f"ws://127.0.0.1:{port}/ws"), mint=loadgen.minter(secret))

def node_cmd(port: int, redis_port: int, secret: str, node_id: str) -> list[str]:
    return [processes.PYTHON, "-m", "wsbroker", "serve", "--host", "127.0.0.1",
            "--port", str(port), "--redis-url", f"redis://127.0.0.1:{redis_port}",
            "--jwt-secret", secret, "--node-id", node_id, "--rate-limit", "0",
            "--max-connections", "0", "--max-send-buffer", "64MiB", "--log-level", "warning",
            "--presence", "bench.>", "--join-leave", "bench.jl.>"]


def token(secret: str, sub: str) -> str:
    claims = {"sub": sub, "exp": int(time.time()) + 3600, "channels": [">"],
              "info": {"name": sub, "role": "bench"}}
    return jwt.encode(claims, secret, algorithm="HS256")


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise RuntimeError(f"{name} not exported")


def script_calls(client: redis.Redis) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
               for name in ("evalsha", "eval"))


class Rpc:
    """A websockets client that awaits the reply to each op it sends."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.next_id = 0

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.ws.send(orjson.dumps({"op": op, "id": self.next_id, **fields}).decode())
        while True:
            frame: dict[str, Any] = orjson.loads(await asyncio.wait_for(self.ws.recv(), 30))
            if frame.get("id") == self.next_id:
                if frame["type"] != "ok":
                    raise RuntimeError(f"{op} failed: {frame}")
                return frame


async def timed(rounds: int, call: Callable[[], Awaitable[object]]) -> dict[str, float]:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return {"p50_ms": round(statistics.median(samples), 2),
            "p99_ms": round(samples[min(len(samples) - 1, int(len(samples) * 0.99))], 2),
            "max_ms": round(samples[-1], 2)}


async def members_phase(args: argparse.Namespace, ports: list[int], secret: str,
                        rds: redis.Redis, redis_port: int) -> dict[str, Any]:
    per_node = args.members // len(ports)
    gens = [audience(port, secret) for port in ports]
    calls_before = script_calls(rds)
    started = time.perf_counter()
    await asyncio.gather(*(connect_all(gen, per_node, 1, 100, name="bench.room")
                           for gen in gens))
    joined_in = time.perf_counter() - started
    subscribed = sum(gen.subscribed for gen in gens)
    calls_joined = script_calls(rds) - calls_before
    report: dict[str, Any] = {"members": subscribed, "join_seconds": round(joined_in, 1),
                              "script_calls_per_join": round(calls_joined / max(subscribed, 1), 2)}
    for index, port in enumerate(ports):
        async with connect(f"ws://127.0.0.1:{port}/ws?token={token(secret, 'reader')}",
                           max_size=None) as ws:
            await ws.recv()  # welcome
            rpc = Rpc(ws)
            stats = await rpc.call("presence_stats", channel=ROOM)
            members = await rpc.call("presence", channel=ROOM)
            assert stats["clients"] == subscribed, stats
            assert len(members["members"]) == subscribed
            report[f"node{index + 1}"] = {
                "clients": stats["clients"], "users": stats["users"],
                "presence_stats": await timed(args.rounds, functools.partial(
                    rpc.call, "presence_stats", channel=ROOM)),
                "presence": await timed(max(10, args.rounds // 4), functools.partial(
                    rpc.call, "presence", channel=ROOM)),
            }
    store = RedisPresenceStore(Settings(redis_url=f"redis://127.0.0.1:{redis_port}",
                                        node_id="bench-harness"))
    report["store_direct"] = {
        "stats": await timed(args.rounds, functools.partial(store.stats, ROOM)),
        "members": await timed(max(10, args.rounds // 4), functools.partial(store.members, ROOM)),
    }
    await store.stop()
    keys = [f"{{ws:{ROOM}}}:presence", f"{{ws:{ROOM}}}:presence:expiry",
            f"{{ws:{ROOM}}}:presence:users"]
    sizes = [int(rds.memory_usage(key, samples=0) or 0) for key in keys]
    report["redis_bytes_per_member"] = {
        "members_hash": round(sizes[0] / subscribed, 1),
        "expiry_zset": round(sizes[1] / subscribed, 1),
        "users_hash": round(sizes[2] / subscribed, 1),
        "total": round(sum(sizes) / subscribed, 1),
    }
    idle_before = script_calls(rds)
    await asyncio.sleep(args.idle)
    idle_calls = script_calls(rds) - idle_before
    report["idle_refresh"] = {"seconds": args.idle, "script_calls": idle_calls,
                              "calls_per_second": round(idle_calls / args.idle, 1)}
    for gen in gens:
        for sub in gen.subscribers:
            if sub.transport is not None:
                sub.transport.abort()
    return report


async def fanout_phase(args: argparse.Namespace, ports: list[int], pids: list[int],
                       secret: str) -> dict[str, Any]:
    per_node = args.listeners // len(ports)
    gens = [audience(port, secret) for port in ports]
    await asyncio.gather(*(connect_all(gen, per_node, 1, 100, name=JL_NAME)
                           for gen in gens))
    listeners = sum(gen.subscribed for gen in gens)

    def frames_seen() -> int:
        return sum(gen.controls for gen in gens)

    # Setup joins are fanned out too; wait until they stop arriving.
    settled = -1
    while settled != frames_seen():
        settled = frames_seen()
        await asyncio.sleep(0.5)
    fanout_before = [(metric(port, "wsbroker_fanout_seconds_sum"),
                      metric(port, "wsbroker_fanout_seconds_count")) for port in ports]
    cpu_before = [processes.cpu_seconds(pid) for pid in pids]
    events = 2 * args.events
    expected = settled + events * listeners
    async with connect(f"ws://127.0.0.1:{ports[0]}/ws?token={token(secret, 'joiner')}") as ws:
        await ws.recv()
        rpc = Rpc(ws)
        started = time.perf_counter()
        for _ in range(args.events):
            await rpc.call("subscribe", channel=JL_ROOM)
            await rpc.call("unsubscribe", channel=JL_ROOM)
        sent = time.perf_counter() - started
        # The raw subscribers only count frames; polling the count is the cheapest probe.
        while frames_seen() < expected and time.perf_counter() - started < 120:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        delivered_in = time.perf_counter() - started
    received = frames_seen() - settled
    cpu = [processes.cpu_seconds(pid) - before for pid, before in zip(pids, cpu_before,
                                                                       strict=True)]
    nodes: dict[str, Any] = {}
    for index, port in enumerate(ports):
        total, count = (metric(port, "wsbroker_fanout_seconds_sum") - fanout_before[index][0],
                        metric(port, "wsbroker_fanout_seconds_count") - fanout_before[index][1])
        nodes[f"node{index + 1}"] = {
            "local_listeners": gens[index].subscribed,
            "fanout_us_per_event": round(total / max(count, 1) * 1e6, 1),
            "fanout_ns_per_delivery": round(total / max(count, 1) / max(
                gens[index].subscribed, 1) * 1e9, 1),
            "cpu_us_per_event": round(cpu[index] / events * 1e6, 1),
        }
    for gen in gens:
        for sub in gen.subscribers:
            if sub.transport is not None:
                sub.transport.abort()
    failed = sum(sum(gen.failures.values()) for gen in gens)
    return {"listeners": listeners, "listeners_failed": failed, "events": events,
            "frames_expected": events * listeners,
            "frames_received": received, "ops_seconds": round(sent, 2),
            "all_delivered_seconds": round(delivered_in, 2), **nodes}


async def refresh_phase(args: argparse.Namespace, redis_port: int) -> dict[str, Any]:
    """The refresh a node does, timed from the harness: many members on many channels."""
    store = RedisPresenceStore(Settings(redis_url=f"redis://127.0.0.1:{redis_port}",
                                        node_id="bench-refresh"))
    channels = max(1, args.refresh_members // 4)
    held: dict[str, list[Member]] = {}
    for i in range(args.refresh_members):
        held.setdefault(f"bench.many.{i % channels}", []).append(Member.of(f"r{i}", f"u{i}"))
    await asyncio.gather(*(store.add(channel, member)
                           for channel, members in held.items() for member in members))
    started = time.perf_counter()
    lost = await store.refresh(held)
    took = time.perf_counter() - started
    await store.stop()
    assert lost == [], len(lost)
    return {"members": args.refresh_members, "channels": channels,
            "seconds_for_all": round(took, 3),
            "us_per_member": round(took / args.refresh_members * 1e6, 2),
            "note": "a node refreshes 1/20 of its members per tick (1 s at the default TTL)"}


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    loadgen.raise_fd_limit()
    logdir = Path(tempfile.mkdtemp(prefix="wsb-presence-bench-"))
    redis_proc, redis_port = processes.start_redis(logdir, LOAD_CPU)
    secret = secrets.token_urlsafe(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSB_")}
    nodes: list[processes.Managed] = []
    try:
        ports = [processes.free_port() for _ in range(args.nodes)]
        for index, port in enumerate(ports):
            nodes.append(processes.start(f"node{index + 1}", node_cmd(
                port, redis_port, secret, f"bench-{index + 1}"), SERVER_CPU, logdir, env))
            processes.wait_port(port, 20, nodes[-1].proc)
        rds = redis.Redis(port=redis_port)
        report: dict[str, Any] = {"presence": await members_phase(args, ports, secret, rds,
                                                                    redis_port)}
        if args.refresh_members:
            report["refresh"] = await refresh_phase(args, redis_port)
        if args.listeners:
            report["join_leave"] = await fanout_phase(
                args, ports, [node.pid for node in nodes], secret)
        rds.close()
        return report
    finally:
        for node in nodes:
            node.stop()
        redis_proc.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.presence",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=10_000)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=200, help="presence_stats calls per node")
    parser.add_argument("--idle", type=float, default=10.0,
                        help="seconds of idle refresh traffic to count")
    parser.add_argument("--listeners", type=int, default=1000,
                        help="subscribers of the join/leave channel (0 skips the phase)")
    parser.add_argument("--events", type=int, default=100, help="join+leave pairs")
    parser.add_argument("--refresh-members", type=int, default=20_000,
                        help="members (4 per channel) for the refresh timing (0 skips it)")
    args = parser.parse_args(argv)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    os.sched_setaffinity(0, {LOAD_CPU}) if hasattr(os, "sched_setaffinity") else None
    report = asyncio.run(amain(args))
    sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
