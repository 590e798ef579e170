"""The Redis engine: channel ``C`` is the Redis pub/sub channel ``<prefix>C``.

One subscriber link (classic SUBSCRIBE, :mod:`wsbroker.backplane.link`) and a
small blocking publishing pool. Every timeout, and why, is told once, in
``link.py``'s module docstring (shared with the Redis Cluster engine).

While the engine knows Redis is down, ``subscribe`` and ``publish`` fail at once
with :class:`BackplaneUnavailable` without touching the network. After a
reconnect every channel is re-subscribed, 1,000 per SUBSCRIBE, pipelined, and
the hub is told to read what those channels missed (``on_resync``).

History goes through the Function library ``wsbroker`` (wsbroker/history.py),
loaded or upgraded on every connect, and again on demand if Redis lost it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, Connection, parse_url
from redis.exceptions import RedisError

from wsbroker.backplane.base import Backplane, BackplaneUnavailable
from wsbroker.backplane.functions import FunctionHistory
from wsbroker.backplane.link import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    CLASSIC,
    CONFIRM_TIMEOUT,
    CONNECT_TIMEOUT,
    PUBLISH_TIMEOUT,
    RESUBSCRIBE_CHUNK,
    SETUP_TIMEOUT,
    YIELD_EVERY,
    Claims,
    Hooks,
    SubscriberLink,
    backoff_delay,
    client_options,
    failure,
    publishing_client,
    redact_url,
    supervise,
)
from wsbroker.backplane.pipelining import Pipeliner
from wsbroker.config import Settings
from wsbroker.history import (
    call_function,
    load_library,
)
from wsbroker.tasks import cancel_and_wait

__all__ = [  # the constants and helpers moved to link.py stay importable from here
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "CONFIRM_TIMEOUT",
    "CONNECT_TIMEOUT",
    "PUBLISH_TIMEOUT",
    "RESUBSCRIBE_CHUNK",
    "SETUP_TIMEOUT",
    "YIELD_EVERY",
    "RedisBackplane",
    "backoff_delay",
    "redact_url",
]

log = logging.getLogger("wsbroker.backplane.redis")


class RedisBackplane(FunctionHistory, Backplane):
    """Dynamic SUBSCRIBE on one dedicated connection, PUBLISH through a small pool."""

    publish_function = "wsb_publish"

    ping_interval: float = 5.0
    """Seconds of silence on the subscriber connection before we PING it."""

    ping_timeout: float = 3.0
    """Seconds a PING may go unanswered before Redis is declared lost."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        if settings.redis_cluster:
            raise ValueError("with --redis-cluster, use ClusterBackplane (create_backplane)")
        if not settings.redis_url:
            raise ValueError("the Redis backplane needs --redis-url")
        self._url = settings.redis_url
        self._prefix = settings.redis_prefix.encode()
        name = re.sub(r"[^A-Za-z0-9._:-]", "_", settings.node_id) or "node"
        sub_options, pub_options = client_options(name)
        url_options: dict[str, Any] = dict(parse_url(self._url))
        sub_class: type[AbstractConnection] = url_options.pop("connection_class", Connection)
        self._pub: Redis = publishing_client(self._url, pub_options)
        self._publisher = Pipeliner(self._pub, "PUBLISH")
        # Wanted channels: prefixed Redis name → our name (the reader's lookup
        # table), and which subscribe call added it.
        self._names: dict[bytes, str] = {}
        self._claims = Claims(self._names.__delitem__)
        self._sub = SubscriberLink(
            CLASSIC,
            Hooks(deliver=lambda: self._on_message, wanted=lambda: list(self._names),
                  wants=self._names.__contains__, lost=self._lost),
            # Our options win over the URL's query string.
            connect=functools.partial(sub_class, **{**url_options, **sub_options}),
            names=self._names, timing=self, name="Redis", tag="wsb-redis", log=log,
        )
        self._up = False
        self._task: asyncio.Task[None] | None = None
        self._first_attempt: asyncio.Event | None = None
        self._loading: asyncio.Task[None] | None = None

    # -- the Backplane interface -------------------------------------------

    @property
    def is_up(self) -> bool:
        return self._up

    @property
    def channels(self) -> frozenset[str]:
        """The channels this engine holds (and re-subscribes after a reconnect)."""
        return frozenset(self._names.values())

    async def start(self) -> None:
        """Connect; returns after the first attempt even when Redis is down."""
        if self._task is not None:
            return
        self._first_attempt = asyncio.Event()
        supervisor = supervise(self._sub, target=f"Redis at {redact_url(self._url)}", log=log,
                               failed=self._signal_first_attempt, connected=self._connected)
        self._task = asyncio.create_task(supervisor, name="wsbroker-redis-backplane")
        waiter = asyncio.create_task(self._first_attempt.wait())
        await asyncio.wait({waiter, self._task}, timeout=SETUP_TIMEOUT + 1,
                           return_when=asyncio.FIRST_COMPLETED)
        await cancel_and_wait(waiter)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        if self._loading is not None:
            await cancel_and_wait(self._loading)
        await self._sub.stop()  # the supervisor normally closed it already
        self._up = False
        self._names.clear()
        self._claims.clear()
        await self._publisher.close()
        await self._pub.aclose()

    async def subscribe(self, channel: str) -> None:
        link = self._sub.link
        if not self._up or link is None:
            raise BackplaneUnavailable("Redis is unavailable")
        key = self._prefix + channel.encode()
        future: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        with self._claims.attempt(key) as claim:
            async with asyncio.timeout(CONFIRM_TIMEOUT):
                async with link.lock:
                    if link.dead:
                        raise BackplaneUnavailable("Redis is unavailable")
                    self._names[key] = channel
                    claim()
                    await self._sub.subscribe(link, key, future)
                error = await future
            if error is not None:
                raise BackplaneUnavailable(failure(error))

    async def unsubscribe(self, channel: str) -> None:
        key = self._prefix + channel.encode()
        self._names.pop(key, None)
        self._claims.discard(key)
        await self._sub.drop(key, channel)

    async def publish(self, channel: str, payload: bytes) -> None:
        if not self._up:
            raise BackplaneUnavailable("Redis is unavailable")
        try:
            await self._publisher.send(self._prefix + channel.encode(), payload)
        except (RedisError, OSError) as exc:
            self._sub.poke()  # check the subscriber connection now, not in 5 s
            raise BackplaneUnavailable(f"Redis publish failed: {exc}") from exc

    async def fcall(self, function: str, channel: str, *args: bytes | int) -> Any:
        if not self._up:
            raise BackplaneUnavailable("Redis is unavailable")
        try:
            return await call_function(self._pub, function, self._prefix + channel.encode(),
                                       *args)
        except (RedisError, OSError) as exc:
            self._sub.poke()  # check the subscriber connection now, not in 5 s
            raise BackplaneUnavailable(f"Redis history call failed: {exc}") from exc

    async def _load_library(self) -> None:
        """Load the Function library for backends that FCALL it (SPEC §7)."""
        try:
            if await load_library(self._pub):
                log.info("loaded the Redis Function library 'wsbroker' on %s",
                         redact_url(self._url))
        except (RedisError, OSError) as exc:
            log.warning("cannot load the Redis Function library 'wsbroker' on %s (%s); "
                        "history needs Redis 7 or newer", redact_url(self._url), exc)

    # -- state (the link's and the supervisor's hooks) -----------------------

    def _connected(self, failures: int, again: bool) -> None:
        log.log(logging.WARNING if failures else logging.INFO,
                "%s Redis at %s after %d failed attempts; %d channels subscribed",
                "reconnected to" if again else "connected to",
                redact_url(self._url), failures, len(self._names))
        self._set_up(True)
        self._signal_first_attempt()
        if self._loading is None or self._loading.done():
            self._loading = asyncio.create_task(self._load_library(), name="wsb-redis-library")
        if again:
            try:
                self._on_resync(list(self._names.values()))
            except Exception:
                log.exception("the backplane resync handler failed")

    def _lost(self, reason: str, notify: bool) -> None:
        if self._up:
            self._up = False
            if notify:
                log.warning("lost Redis at %s (%s); %d channels will be re-subscribed on "
                            "reconnect", redact_url(self._url), reason, len(self._names))
                self._notify(False)

    def _set_up(self, up: bool) -> None:
        if self._up != up:
            self._up = up
            self._notify(up)

    def _notify(self, up: bool) -> None:
        try:
            self._on_state(up)
        except Exception:
            log.exception("the backplane state handler failed")

    def _signal_first_attempt(self) -> None:
        if self._first_attempt is not None:
            self._first_attempt.set()
