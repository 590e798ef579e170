"""The floor: the least a websockets + Redis broadcaster can do, as a yardstick.

No auth (a ``?token=`` is accepted and ignored), no validation, no limits: one
Redis SUBSCRIBE per channel, and per Redis message one frame built once and
handed to ``websockets.broadcast``. wsbroker ÷ floor is the price of its features.
Protocol-compatible with wsbroker for what the load generator uses, and on the
same event loop (uvloop when installed, as ``wsbroker serve`` does).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Callable

import orjson
import redis.asyncio as aioredis
from websockets.asyncio.server import ServerConnection, broadcast, serve


async def main(port: int, redis_url: str, prefix: str) -> None:
    subs: dict[str, set[ServerConnection]] = {}
    pubsub = aioredis.from_url(redis_url).pubsub()
    pump: asyncio.Task[None] | None = None
    lock = asyncio.Lock()  # concurrent first subscribes would each open a connection

    async def fan_out() -> None:
        async for msg in pubsub.listen():
            if msg["type"] == "message":
                channel = msg["channel"][len(prefix) :]
                frame = b'{"type":"message","channel":"%s","data":%s}' % (channel, msg["data"])
                broadcast(subs[channel.decode()], frame, text=True)

    async def handler(ws: ServerConnection) -> None:
        nonlocal pump
        mine: list[str] = []
        try:
            async for raw in ws:
                op = orjson.loads(raw)
                channel = op["channel"]
                async with lock:
                    if channel not in subs:
                        await pubsub.subscribe(prefix + channel)
                        subs[channel] = set()
                        if pump is None:
                            pump = asyncio.create_task(fan_out())
                subs[channel].add(ws)
                mine.append(channel)
                ok = {"type": "ok", "id": op.get("id"), "channel": channel}
                await ws.send(orjson.dumps(ok), text=True)
        finally:
            for channel in mine:
                subs[channel].discard(ws)

    async with serve(handler, "127.0.0.1", port, compression=None) as server:
        await server.serve_forever()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--prefix", default="ws:")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    a = p.parse_args()
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if a.loop == "uvloop":  # like `wsbroker serve`: uvloop when installed
        with contextlib.suppress(ImportError):
            import uvloop

            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main(a.port, a.redis_url, a.prefix))
