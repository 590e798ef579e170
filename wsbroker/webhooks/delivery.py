"""Batching and delivery: events in (never blocking), signed POSTs out, with retries.

Events wait at most :data:`BATCH_WINDOW` (250 ms) and go at most
:data:`BATCH_SIZE` (100) to a request, so a burst of joins costs a few
requests, not thousands. Each batch is one Standard Webhooks message: one
``webhook-id`` for all its attempts, a fresh timestamp and signature on each.

Nothing here is awaited by the node's message path: :meth:`Dispatcher.emit` is
a synchronous append. What waits (a slow or failing receiver) waits in this
module's own tasks, and what it holds is bounded: at most ``--webhook-queue``
events are pending (queued or in a batch not yet delivered); more are dropped
and counted, never buffered.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import random
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from wsbroker.logs import Throttled
from wsbroker.metrics import Metrics
from wsbroker.tasks import cancel_and_wait
from wsbroker.webhooks.signing import sign

log = logging.getLogger("wsbroker.webhooks")

BATCH_WINDOW = 0.25
BATCH_SIZE = 100
BATCH_BYTES = 768 * 1024
"""Client data one batch carries at most (unless one event alone is larger), so a
request stays under the 1 MiB body limit common to receivers' frameworks."""
MAX_IN_FLIGHT = 16
"""Requests open at once; further batches wait their turn (their events stay counted)."""

MAX_RETRY_AFTER = 3600.0
JITTER = 0.2
"""Each retry waits its scheduled pause ±20 %, so failed batches do not return in step."""

RESPONSE_READ_LIMIT = 64 * 1024


@dataclass(slots=True)
class Batch:
    """One request's worth of events, signed anew on each attempt."""

    id: str
    body: bytes
    size: int
    failures: int = 0


class Dispatcher:
    """Turns events into batches and batches into delivered requests."""

    def __init__(
        self,
        url: str,
        keys: Sequence[bytes],
        metrics: Metrics,
        *,
        limit: int,
        timeout: float,
        retry_delays: Sequence[float],
        window: float = BATCH_WINDOW,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        self._url = url
        self._keys = tuple(keys)
        self._metrics = metrics
        self._limit = limit
        self._timeout = timeout
        self._retry_delays = tuple(retry_delays)
        self._window = window
        self._batch_size = batch_size
        self._events: list[dict[str, Any]] = []
        self._event_bytes = 0
        self._pending = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._hurry = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._log_failure = Throttled(log, logging.WARNING)
        self._log_drop = Throttled(log, logging.WARNING)

    @property
    def pending(self) -> int:
        """Events accepted and not yet delivered, dropped or given up on."""
        return self._pending

    # -- events in ----------------------------------------------------------------

    def emit(self, event: dict[str, Any], size: int = 0) -> None:
        """Queue one event (synchronous, O(1)); drop and count it when the queue is full.

        ``size`` is the length of the client data the event carries, if any.
        """
        if self._pending >= self._limit:
            self._drop(1, "queue_full")
            return
        self._pending += 1
        if self._events and self._event_bytes + size > BATCH_BYTES:
            self._cut()  # this event would make the batch too big: it starts the next
        self._events.append(event)
        self._event_bytes += size
        if len(self._events) >= self._batch_size:
            self._cut()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._window, self._cut)

    def _cut(self) -> None:
        """Everything queued becomes one batch (the queue never exceeds one batch)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        events, self._events = self._events, []
        self._event_bytes = 0
        if not events:
            return
        body = orjson.dumps({"time_ms": time_ms(), "events": events})
        batch = Batch("msg_" + secrets.token_hex(12), body, len(events))
        task = asyncio.create_task(self._deliver(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- requests out ---------------------------------------------------------------

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=MAX_IN_FLIGHT),
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            headers={"User-Agent": "wsbroker-webhooks"},
        )

    async def _deliver(self, batch: Batch) -> None:
        """Attempt until delivered, refused, or out of retries; the batch's events
        stop counting as pending when this returns (or is cancelled)."""
        try:
            while True:
                retry, retry_after = await self._attempt(batch)
                if not retry:
                    return
                if batch.failures >= len(self._retry_delays):
                    self._drop(batch.size, "retries_exhausted")
                    return
                pause = self._retry_delays[batch.failures] * random.uniform(1 - JITTER, 1 + JITTER)
                if retry_after is not None:
                    pause = retry_after
                batch.failures += 1
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(pause):
                        await self._hurry.wait()  # set when the node drains
        except asyncio.CancelledError:
            self._drop(batch.size, "shutdown")
            raise
        finally:
            self._pending -= batch.size

    async def _attempt(self, batch: Batch) -> tuple[bool, float | None]:
        """One signed POST → (retry?, Retry-After seconds if the receiver gave them)."""
        assert self._session is not None, "dispatcher not started"
        headers = sign(self._keys, batch.id, int(time.time()), batch.body)
        headers["Content-Type"] = "application/json"
        async with self._slots:
            try:
                async with asyncio.timeout(self._timeout), self._session.post(
                    self._url, data=batch.body, headers=headers, allow_redirects=False
                ) as response:
                    status = response.status
                    retry_after = _retry_after(response.headers.get("Retry-After"))
                    await response.content.read(RESPONSE_READ_LIMIT)
            except TimeoutError:
                return self._failed(batch, "timeout", f"no answer within {self._timeout:g} s")
            except (aiohttp.ClientError, OSError) as exc:
                return self._failed(batch, "connection_error", str(exc) or type(exc).__name__)
        if 200 <= status < 300:
            self._count("success")
            return False, None
        if 300 <= status < 400:
            return self._failed(batch, "redirect", f"HTTP {status} (redirects are not followed)",
                                retry_after)
        if status == 429:
            return self._failed(batch, "throttled", "HTTP 429", retry_after)
        if status >= 500:
            return self._failed(batch, "server_error", f"HTTP {status}", retry_after)
        self._count("rejected")
        self._drop(batch.size, "rejected")
        self._log_failure("webhook: {count} request(s) failed in the last 10 s; latest %s: "
                          "HTTP %d, not retried (the receiver refused it)", batch.id, status)
        return False, None

    def _failed(
        self, batch: Batch, result: str, reason: str, retry_after: float | None = None
    ) -> tuple[bool, float | None]:
        self._count(result)
        self._log_failure("webhook: {count} request(s) failed in the last 10 s; latest %s "
                          "(attempt %d): %s; will retry", batch.id, batch.failures + 1, reason)
        return True, retry_after

    def _count(self, result: str) -> None:
        self._metrics.webhook_requests.labels(result).inc()

    def _drop(self, count: int, reason: str) -> None:
        self._metrics.webhook_events_dropped.labels(reason).inc(count)
        self._log_drop("webhook: dropped {count} time(s) in the last 10 s; latest %d "
                       "event(s): %s", count, reason.replace("_", " "))

    # -- shutdown -------------------------------------------------------------------

    async def drain(self, deadline: float) -> None:
        """Send what is pending until ``deadline`` (event-loop time): the batch being
        filled goes now, batches waiting to retry try once more at once."""
        self._cut()
        self._hurry.set()
        await asyncio.sleep(0)
        self._hurry.clear()
        remaining = deadline - asyncio.get_running_loop().time()
        if self._tasks and remaining > 0:
            await asyncio.wait(set(self._tasks), timeout=remaining)

    async def close(self) -> None:
        """Stop now; undelivered events are dropped and counted (reason ``shutdown``)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._events:
            self._drop(len(self._events), "shutdown")
            self._pending -= len(self._events)
            self._events = []
            self._event_bytes = 0
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            await cancel_and_wait(task)
        if self._session is not None:
            await self._session.close()
            self._session = None


def time_ms() -> int:
    return int(time.time() * 1000)


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date; None if absent."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max(when.timestamp() - time.time(), 0.0), MAX_RETRY_AFTER)
