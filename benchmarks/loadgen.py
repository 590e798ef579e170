"""Load generator process: the harness's subscribers on one pinned core.

The subscribers themselves (raw ``asyncio.Protocol`` clients, the counting, the
step report) live in :mod:`wsbroker.bench`, shared with ``wsbroker bench``;
this module runs them in a process of their own so they can be pinned to the
load core and driven by the harness over pipes, one JSON object per line:
stdout carries events (``progress``, ``ready``, ``begun``, ``stats``, ``end``,
``bye``); stdin carries commands (``begin``/``stats``/``end``/``quit``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import resource
import sys
import time
from typing import Any

import jwt
import orjson

from wsbroker.bench.subscribers import Audience, Endpoint, connect_all, step_report


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


def minter(secret: str) -> Any:
    """A distinct HS256 token per subscriber, as a storm of different users presents."""

    def mint(sub_id: int) -> str:
        claims = {"sub": f"bench-{sub_id}", "exp": int(time.time()) + 3600, "channels": [">"]}
        return jwt.encode(claims, secret, algorithm="HS256")

    return mint


async def command_loop(gen: Audience) -> None:
    """Serve the harness's commands until ``quit`` or end of input."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    while line := await reader.readline():
        cmd = orjson.loads(line)
        name = cmd.get("cmd")
        if name == "begin":
            gen.begin(int(cmd["step"]))  # lost connections and close codes count per step
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
    gen.close()
    emit("bye")


async def amain(args: argparse.Namespace) -> None:
    endpoint = Endpoint.from_url(f"ws://{args.host}:{args.port}{args.path}")
    gen = Audience(endpoint, mint=minter(args.token_secret) if args.token_secret else None)
    cpu0 = cpu_seconds()

    def progress() -> None:
        emit("progress", subscribed=gen.subscribed, failed=sum(gen.failures.values()))

    seconds = await connect_all(
        gen, args.subscribers, args.channels, args.concurrency, args.channel_name, progress
    )
    per_channel = gen.per_channel(args.channels)
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
