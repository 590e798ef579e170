"""The fan-out hot path alone: nanoseconds per delivery, in one process.

``python -m benchmarks.fanout`` starts an in-process node on the in-process
backplane, connects real WebSocket clients over loopback (raw sockets that
read and discard), subscribes them all to one channel, then times
``Hub.on_message`` (validate once, frame once, one ``deliver`` per subscriber).
The writes to the sockets happen after the timed call (end of the loop turn),
so the figure is the per-subscriber cost of the queueing path, the part a
write-path change can make slower. The median call of the best round is far
less sensitive to other load on the machine than the rate-stepping harness
(process CPU time is too coarse here: it moves in scheduler ticks on many VMs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time

import jwt

SECRET = "fanout-benchmark-secret-0123456789abcdef"


async def _client(port: int, token: str, ready: asyncio.Event, count: list[int],
                  total: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                 "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
    await reader.readuntil(b"\r\n\r\n")
    await reader.read(256)  # the welcome
    # subscribe (a masked text frame)
    body = b'{"op":"subscribe","id":1,"channel":"fan"}'
    mask = b"\x00\x00\x00\x00"
    writer.write(bytes((0x81, 0x80 | len(body))) + mask + body)
    await reader.read(256)  # the ok
    count[0] += 1
    if count[0] == total:
        ready.set()
    with contextlib.suppress(ConnectionError):
        while await reader.read(1 << 16):
            pass
    writer.close()


async def run(subscribers: int, messages: int, rounds: int) -> float:
    from wsbroker import server
    from wsbroker.config import Settings
    from wsbroker.server import Node

    server.PING_INTERVAL = None  # type: ignore[assignment]  # these clients never answer PINGs

    settings = Settings(host="127.0.0.1", port=0, jwt_secret=SECRET,
                        log_level="warning")
    node = Node(settings)
    await node.start()
    token = jwt.encode({"sub": "b", "channels": [">"], "exp": int(time.time()) + 3600},
                       SECRET, algorithm="HS256")
    ready = asyncio.Event()
    count = [0]
    clients = [asyncio.ensure_future(_client(node.port, token, ready, count, subscribers))
               for _ in range(subscribers)]
    await asyncio.wait_for(ready.wait(), 60)
    payload = b'{"price":101.5,"sym":"AAPL"}'
    assert node.hub.subscription_count == subscribers, node.hub.subscription_count
    best = float("inf")
    for _ in range(rounds):
        calls: list[float] = []
        for _ in range(messages):
            started = time.perf_counter()
            node.hub.on_message("fan", payload)
            calls.append(time.perf_counter() - started)
            await asyncio.sleep(0)  # the flush: one write per client
            await asyncio.sleep(0)
        assert node.hub.subscription_count == subscribers, "clients were dropped"
        best = min(best, statistics.median(calls) / subscribers * 1e9)
    await node.stop()
    for client in clients:
        client.cancel()
    await asyncio.gather(*clients, return_exceptions=True)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fanout")
    parser.add_argument("--subscribers", type=int, default=500)
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    best = asyncio.run(run(args.subscribers, args.messages, args.rounds))
    print(f"fan-out: {best:.0f} ns per delivery (best of {args.rounds} rounds of "
          f"{args.messages} messages to {args.subscribers} subscribers)")


if __name__ == "__main__":
    main()
