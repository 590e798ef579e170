"""Publishes made in one event-loop turn leave for Redis in one pipeline.

A node publishes for many callers at once: clients' ``publish`` ops, HTTP API
requests. Sent one by one, each pays a pool checkout, a write and a reply read
through redis-py's coroutine chain, and the HTTP API on the Redis backplane
topped out near 6,000–8,000 publishes per CPU-second. Queued for the rest of
the loop turn and sent as one pipeline (no transaction: nothing is atomic
across callers), a burst costs one checkout and one round trip, and each
caller still gets its own reply or error.

Order: a caller awaits its publish before it makes the next (a session's ops
run one at a time), so what one connection publishes keeps its order; between
callers there is no order to keep.
"""

from __future__ import annotations

import asyncio
from typing import Any

MAX_BATCH = 512
"""Publishes per pipeline at most; a larger burst is sent in several."""

Pending = tuple[bytes, bytes, "asyncio.Future[None]"]


class Pipeliner:
    """Gathers ``COMMAND key payload`` calls made in one loop turn into one pipeline."""

    def __init__(self, client: Any, command: str, max_batch: int = MAX_BATCH) -> None:
        self._client = client
        self._command = command
        self._max_batch = max_batch
        self._batch: list[Pending] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def send(self, key: bytes, payload: bytes) -> None:
        """``COMMAND key payload``; returns once Redis has answered it, raises its error."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._batch.append((key, payload, future))
        if len(self._batch) == 1:
            loop.call_soon(self._flush)
        elif len(self._batch) >= self._max_batch:
            self._flush()
        await future

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        if batch:
            task = asyncio.create_task(self._execute(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _execute(self, batch: list[Pending]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for key, payload, _ in batch:
            pipe.execute_command(self._command, key, payload)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except BaseException as exc:
            failure = exc if isinstance(exc, Exception) else ConnectionError("publish cancelled")
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, _, future), reply in zip(batch, replies, strict=True):
            if future.done():  # its caller gave up waiting
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(None)

    async def close(self) -> None:
        """Wait for the pipelines in flight (their callers are waiting for them)."""
        self._flush()
        if self._sending:
            await asyncio.wait(set(self._sending))
