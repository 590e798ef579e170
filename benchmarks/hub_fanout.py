"""The hub's fan-out in one process: history channels against plain ones.

```
python -m benchmarks.hub_fanout                  # 10 and 1,000 subscribers per channel
python -m benchmarks.hub_fanout --messages 20000 --repeat 7
```

The harness (``python -m benchmarks --servers wsbroker,history``) measures
the whole path through sockets, where a shared machine's noise is larger than
the difference sought. This isolates what history adds to the hot path: the
same ``Hub.on_message`` is timed on a plain channel (a ``wsb1`` envelope with
``from``, as a client publish) and on a history channel (the envelope with
``offset`` and ``epoch``, each the next offset), delivering to subscribers
that queue the frame as a session does (an append, no socket). It counts the
process's CPU time (other tenants of a shared machine do not inflate it) and
keeps the best of ``--repeat`` runs, alternating which kind goes first.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time

import orjson

from wsbroker.backplane.memory import MemoryBackplane
from wsbroker.history import HistoryRules
from wsbroker.hub import Hub, Outgoing
from wsbroker.metrics import Metrics
from wsbroker.protocol import encode_envelope


class Sink:
    """A subscriber that queues the frame, as a session's ``deliver`` does."""

    def __init__(self) -> None:
        self.queue: list[bytes] = []

    def deliver(self, message: Outgoing) -> bool:
        self.queue.append(message.wire)
        return True

    def unsubscribed(self, channel: str, reason: str) -> None:
        raise AssertionError("a benchmark subscriber is never dropped")


async def run(subscribers: int, messages: int, repeat: int) -> dict[str, float]:
    engine = MemoryBackplane()
    hub = Hub(engine, Metrics(), HistoryRules.parse(["hist.>=1000"]))
    await engine.start()
    sinks = [Sink() for _ in range(subscribers)]
    for sink in sinks:
        await hub.subscribe("plain.c", sink)
        await hub.subscribe("hist.c", sink)
    position = hub.position("hist.c")
    assert position is not None
    data = orjson.dumps({"p": "x" * 90})
    plain = [encode_envelope(data, "bench") for _ in range(messages)]
    best: dict[str, float] = {}
    offset = position.offset
    for round_ in range(repeat):
        history = [encode_envelope(data, "bench", offset + i + 1, position.epoch)
                   for i in range(messages)]
        offset += messages
        kinds = [("plain", "plain.c", plain), ("history", "hist.c", history)]
        for label, channel, payloads in kinds[::1 if round_ % 2 else -1]:  # alternate
            for sink in sinks:
                sink.queue.clear()
            gc.collect()
            started = time.process_time()
            for payload in payloads:
                hub.on_message(channel, payload)
                if len(sinks[0].queue) > 1000:
                    for sink in sinks:
                        sink.queue.clear()
            elapsed = (time.process_time() - started) / messages
            best[label] = min(best.get(label, elapsed), elapsed)
    await hub.close()
    await engine.stop()
    return {label: seconds * 1e6 for label, seconds in best.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hub_fanout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subscribers", type=int, nargs="+", default=[10, 1000])
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    for count in args.subscribers:
        messages = max(100, args.messages * 10 // max(count, 10))
        result = asyncio.run(run(count, messages, args.repeat))
        print(f"{count:>5} subscribers: plain {result['plain']:.2f} µs/message, history "
              f"{result['history']:.2f} µs/message, history ÷ plain "
              f"{result['history'] / result['plain']:.3f}")


if __name__ == "__main__":
    main()
