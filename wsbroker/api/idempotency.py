"""Publish once per ``idempotency_key``: a backend may retry a publish without duplicates.

The same key on the same channel within :data:`WINDOW` (5 minutes) publishes
once and answers every repeat with the first result (SPEC §12). A publish that
failed leaves no trace, so the retry it calls for really publishes.

* **Memory engine** (one node): a dict of futures, bounded to
  :data:`MEMORY_LIMIT` entries (the oldest go first).
* **Redis / Redis Cluster** (fleet-wide): ``SET <key> pending NX PX 300000``
  claims the key; the winner publishes and stores its result in the key
  (``XX KEEPTTL``); a repeat that finds a result answers it, one that finds
  ``pending`` waits for it (a publish takes at most a few seconds). The key is
  ``<prefix>idem:`` + SHA-256 of channel and key, so any key length costs the same.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import orjson

from wsbroker.backplane import BackplaneUnavailable
from wsbroker.history import Published
from wsbroker.registry import REDIS_FAILURES, AnyRedis

WINDOW = 300.0
MEMORY_LIMIT = 100_000
PENDING = b"pending"
WAIT_FOR_FIRST = 5.0
"""Seconds a repeat waits for the first publish to finish before answering 503."""
POLL = 0.02
REDIS_TIMEOUT = 3.0

Publish = Callable[[], Awaitable[Published]]
T = TypeVar("T")


class Idempotency(abc.ABC):
    """Runs a publish at most once per (channel, key) within the window."""

    @abc.abstractmethod
    async def once(self, channel: str, key: str, publish: Publish) -> Published:
        """The first result for (channel, key), publishing now if there is none.

        Raises whatever ``publish`` raises, or ``BackplaneUnavailable``.
        """


class MemoryIdempotency(Idempotency):
    """In-node memory: enough for the single node of the memory engine."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[tuple[str, str], tuple[float, asyncio.Future[Published]]] = {}

    async def once(self, channel: str, key: str, publish: Publish) -> Published:
        now = self._clock()
        entry = self._entries.get((channel, key))
        if entry is not None and entry[0] > now:
            return await asyncio.shield(entry[1])
        self._expire(now)
        future: asyncio.Future[Published] = asyncio.get_running_loop().create_future()
        self._entries[(channel, key)] = (now + WINDOW, future)
        try:
            result = await publish()
        except BaseException as exc:
            # Failed: forget it, so that the retry it calls for publishes.
            if self._entries.get((channel, key), (0, None))[1] is future:
                del self._entries[(channel, key)]
            future.set_exception(exc if isinstance(exc, Exception) else
                                 BackplaneUnavailable("publish cancelled"))
            future.exception()  # retrieved: no "never retrieved" warning if nobody waited
            raise
        future.set_result(result)
        return result

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            oldest = next(iter(entries))
            expires, _ = entries[oldest]
            if expires > now and len(entries) < MEMORY_LIMIT:
                return
            del entries[oldest]


class RedisIdempotency(Idempotency):
    """Fleet-wide, through the node's Redis client."""

    def __init__(self, client: AnyRedis, prefix: str) -> None:
        self._client = client
        self._prefix = f"{prefix}idem:".encode()

    def _key(self, channel: str, key: str) -> bytes:
        digest = hashlib.sha256(f"{channel}\0{key}".encode()).hexdigest()
        return self._prefix + digest.encode()

    async def once(self, channel: str, key: str, publish: Publish) -> Published:
        redis_key = self._key(channel, key)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_FOR_FIRST
        while True:
            if await self._call(self._client.set(redis_key, PENDING, nx=True,
                                                 px=int(WINDOW * 1000))):
                return await self._publish_first(redis_key, publish)
            stored = await self._call(self._client.get(redis_key))
            if stored is not None and stored != PENDING:
                return _decode(stored if isinstance(stored, bytes) else stored.encode())
            # Pending (another request is publishing), or gone (it failed): look again.
            if loop.time() >= deadline:
                raise BackplaneUnavailable("an earlier publish with this idempotency_key "
                                           "has not finished; retry shortly")
            await asyncio.sleep(POLL)

    async def _publish_first(self, redis_key: bytes, publish: Publish) -> Published:
        try:
            result = await publish()
        except BaseException:
            with contextlib.suppress(*REDIS_FAILURES):
                async with asyncio.timeout(REDIS_TIMEOUT):
                    await self._client.delete(redis_key)
            raise
        # Published: if storing the result fails, repeats wait for it and get a 503,
        # never a second publish.
        with contextlib.suppress(BackplaneUnavailable):
            await self._call(self._client.set(redis_key, _encode(result), xx=True,
                                               keepttl=True))
        return result

    @staticmethod
    async def _call(command: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                return await command
        except REDIS_FAILURES as exc:
            raise BackplaneUnavailable(f"Redis did not answer: {exc}") from exc


def _encode(result: Published) -> bytes:
    return orjson.dumps({"offset": result.offset, "epoch": result.epoch})


def _decode(stored: bytes) -> Published:
    fields = orjson.loads(stored)
    return Published(fields.get("offset"), fields.get("epoch"))
