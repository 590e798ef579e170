"""The Redis engine: channel ``C`` is the Redis pub/sub channel ``<prefix>C``.

Timeouts, and why (redis-py 8 changed the defaults under us):

* **Subscriber connection: no read timeout** (``socket_timeout=None``, reads
  with ``math.inf``). redis-py 8 defaults ``socket_timeout`` to 5 s, which makes
  an idle pub/sub reader fail after 5 quiet seconds. Liveness comes from our
  own check instead: after :attr:`RedisBackplane.ping_interval` (5 s) with
  nothing received we send ``PING`` on the pub/sub connection and declare Redis
  lost if no reply arrives within :attr:`RedisBackplane.ping_timeout` (3 s). A
  Redis that dies or restarts closes the socket and is noticed at once; a
  silent network partition is noticed within about 8 s. TCP keepalive stays on
  (redis-py default) as a second line for the OS.
* **Connect: 3 s** (``socket_connect_timeout``), and the whole connect +
  handshake + re-subscribe sequence is bounded by 10 s, so a half-open Redis
  cannot wedge the reconnect loop.
* **Publishing client: 3 s** per command, **no redis-py retries** (its default
  of 10 retries with backoff would make a publish hang for seconds during an
  outage). While the engine knows Redis is down, ``subscribe`` and ``publish``
  fail at once with :class:`BackplaneUnavailable` without touching the network.
* **Reconnect**: exponential backoff from 100 ms doubling to a 5 s cap, with
  equal jitter (half fixed, half random) so a fleet of nodes does not reconnect
  in lock-step and never spins with a zero delay.

Design: one reader task owns the subscriber connection and reads every reply.
Redis answers SUBSCRIBE/UNSUBSCRIBE/PING in the order they were sent, so each
command we write queues what it expects in a FIFO; the reader pops the FIFO and
resolves the waiter. ``subscribe`` therefore returns only once Redis confirmed
the subscription, which is what SPEC §4's delivery guarantee needs. Messages are
handed to the synchronous ``on_message`` handler straight from the reader, with
no per-message task or await. The subscriber speaks RESP2 whatever the URL says
(redis-py 8 defaults to RESP3, where pub/sub replies go through a push handler
that logs every message). If the node reads slower than Redis publishes, Redis's
``client-output-buffer-limit pubsub`` cuts the connection: that is handled like
any loss (reconnect, re-subscribe; messages in between are not replayed).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, Connection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from wsbroker.backplane.base import Backplane, BackplaneUnavailable
from wsbroker.config import Settings

log = logging.getLogger("wsbroker.backplane.redis")

CONNECT_TIMEOUT = 3.0
SETUP_TIMEOUT = 10.0
PUBLISH_TIMEOUT = 3.0
CONFIRM_TIMEOUT = 5.0
BACKOFF_BASE = 0.1
BACKOFF_CAP = 5.0
RESUBSCRIBE_CHUNK = 1000
YIELD_EVERY = 1000

_SUBSCRIBE = b"subscribe"
_UNSUBSCRIBE = b"unsubscribe"
_PONG = b"pong"
_MESSAGE = b"message"


def backoff_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Delay before reconnect attempt ``attempt`` (0-based): equal jitter, 100 ms → 5 s."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(attempt, 16))
    draw = (rng or random).random()
    return float(ceiling / 2 + draw * ceiling / 2)


def redact_url(url: str) -> str:
    """The URL without its password, fit for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return parts._replace(netloc=user + netloc).geturl()


@dataclass(slots=True)
class _Pending:
    """One reply the reader expects; ``future`` gets None when it came, else why not."""

    kind: bytes
    channel: bytes | None
    command: int
    future: asyncio.Future[str | None] | None = None


@dataclass(slots=True, eq=False)
class _Link:
    """One subscriber connection and everything that dies with it."""

    conn: AbstractConnection
    fifo: deque[_Pending] = field(default_factory=deque)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    poke: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    received: int = 0
    dead: bool = False


class RedisBackplane(Backplane):
    """Dynamic SUBSCRIBE on one dedicated connection, PUBLISH through a small pool."""

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
        # TCP keepalive is on by default in redis-py 8 (30 s idle, 3 probes 5 s apart).
        common: dict[str, Any] = {
            "decode_responses": False,
            "socket_connect_timeout": CONNECT_TIMEOUT,
            "retry": Retry(NoBackoff(), 0),  # we retry, with our backoff, or fail fast
            "health_check_interval": 0,
        }
        # The subscriber connection is built directly, not through a pool: it
        # speaks RESP2 (pub/sub replies are plain arrays, no push handlers, no
        # maintenance-notification reconnects behind our back) and our options
        # win over the URL's query string.
        url_options: dict[str, Any] = dict(parse_url(self._url))
        self._sub_class: type[AbstractConnection] = url_options.pop("connection_class",
                                                                     Connection)
        self._sub_options: dict[str, Any] = {
            **url_options, **common, "socket_timeout": None, "protocol": 2,
            "client_name": f"wsbroker:{name}:sub", "socket_read_size": 256 * 1024,
        }
        self._pub: Redis = Redis.from_url(
            self._url, socket_timeout=PUBLISH_TIMEOUT, client_name=f"wsbroker:{name}:pub",
            **common,
        )
        # Wanted channels: prefixed Redis name → our name (the reader's lookup
        # table), and → the token of the subscribe call that added it.
        self._names: dict[bytes, str] = {}
        self._tokens: dict[bytes, int] = {}
        self._counter = itertools.count(1)
        self._link: _Link | None = None
        self._up = False
        self._task: asyncio.Task[None] | None = None
        self._first_attempt: asyncio.Event | None = None

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
        self._task = asyncio.create_task(self._supervise(), name="wsbroker-redis-backplane")
        waiter = asyncio.create_task(self._first_attempt.wait())
        await asyncio.wait({waiter, self._task}, timeout=SETUP_TIMEOUT + 1,
                           return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._link is not None:  # the supervisor normally closed it already
            await self._close_link(self._link, "backplane stopped", notify=False)
        self._up = False
        self._names.clear()
        self._tokens.clear()
        await self._pub.aclose()

    async def subscribe(self, channel: str) -> None:
        link = self._link
        if not self._up or link is None:
            raise BackplaneUnavailable("Redis is unavailable")
        key = self._prefix + channel.encode()
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        token = next(self._counter)
        try:
            async with asyncio.timeout(CONFIRM_TIMEOUT):
                async with link.lock:
                    if link.dead:
                        raise BackplaneUnavailable("Redis is unavailable")
                    self._names[key] = channel
                    self._tokens[key] = token
                    await self._write(link, [_Pending(_SUBSCRIBE, key, 0, future)],
                                      b"SUBSCRIBE", key)
                failure = await future
            if failure is not None:
                raise BackplaneUnavailable(failure)
        except BaseException as exc:
            # The caller will not count this channel as subscribed: forget it
            # (unless a later subscribe call owns it now). If Redis confirms it
            # after all, the reader unsubscribes what nobody wants.
            if self._tokens.get(key) == token:
                del self._tokens[key]
                del self._names[key]
            if isinstance(exc, TimeoutError):
                raise BackplaneUnavailable("Redis did not confirm the subscription") from None
            raise

    async def unsubscribe(self, channel: str) -> None:
        key = self._prefix + channel.encode()
        self._names.pop(key, None)
        self._tokens.pop(key, None)
        link = self._link
        if link is None:
            return  # down: there is no subscription to drop; we will not re-subscribe it
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(CONFIRM_TIMEOUT):
                async with link.lock:
                    if link.dead or key in self._names:
                        return  # gone, or subscribed again meanwhile: nothing to send
                    await self._write(link, [_Pending(_UNSUBSCRIBE, key, 0, future)],
                                      b"UNSUBSCRIBE", key)
                await future
        except (BackplaneUnavailable, TimeoutError):
            # Never fails: if the connection is dying the subscription dies with it.
            log.debug("unsubscribe %s not confirmed; the connection is going away", channel)

    async def publish(self, channel: str, payload: bytes) -> None:
        if not self._up:
            raise BackplaneUnavailable("Redis is unavailable")
        try:
            await self._pub.publish(self._prefix + channel.encode(), payload)
        except (RedisError, OSError) as exc:
            link = self._link
            if link is not None:
                link.poke.set()  # check the subscriber connection now, not in 5 s
            raise BackplaneUnavailable(f"Redis publish failed: {exc}") from exc

    # -- connection life cycle ---------------------------------------------

    async def _supervise(self) -> None:
        """Connect, serve until the connection is lost, back off, repeat."""
        loop = asyncio.get_running_loop()
        attempt = 0
        failures = 0
        connected_before = False
        while True:
            try:
                link = await self._open()
            except Exception as exc:
                expected = isinstance(exc, RedisError | OSError | TimeoutError |
                                      BackplaneUnavailable)
                # Say it once, then every 10th attempt (about every 50 s at the cap).
                loud = failures % 10 == 0 or not expected
                level = logging.WARNING if loud else logging.DEBUG
                log.log(level, "cannot connect to Redis at %s: %s; retrying with backoff",
                        redact_url(self._url), str(exc) or type(exc).__name__,
                        exc_info=not expected)
                failures += 1
                self._signal_first_attempt()
                await asyncio.sleep(backoff_delay(attempt))
                attempt += 1
                continue
            since = loop.time()
            log.log(logging.WARNING if failures else logging.INFO,
                    "%s Redis at %s after %d failed attempts; %d channels subscribed",
                    "reconnected to" if connected_before else "connected to",
                    redact_url(self._url), failures, len(self._names))
            failures = 0
            connected_before = True
            self._set_up(True)
            self._signal_first_attempt()
            try:
                await link.lost.wait()
            finally:
                await self._close_link(link, "backplane stopped", notify=False)
            if loop.time() - since >= BACKOFF_CAP:
                attempt = 0  # it was a healthy connection: start the backoff afresh
            await asyncio.sleep(backoff_delay(attempt))
            attempt += 1

    async def _open(self) -> _Link:
        """A connected, confirmed subscriber link holding every wanted channel."""
        link = _Link(self._sub_class(**self._sub_options))
        try:
            async with asyncio.timeout(SETUP_TIMEOUT):
                await link.conn.connect()  # type: ignore[no-untyped-call]
                # From here unsubscribe() sends on this link; subscribe() waits for up.
                self._link = link
                link.tasks.append(asyncio.create_task(self._read(link), name="wsb-redis-read"))
                link.tasks.append(asyncio.create_task(self._watch(link), name="wsb-redis-ping"))
                await self._resubscribe(link)
        except BaseException:
            await self._close_link(link, "cannot set up the Redis subscriber", notify=False)
            raise
        return link

    async def _resubscribe(self, link: _Link) -> None:
        """SUBSCRIBE every wanted channel, pipelined in chunks, and await the last reply."""
        keys = list(self._names)
        futures: list[asyncio.Future[str | None]] = []
        loop = asyncio.get_running_loop()
        for start in range(0, len(keys), RESUBSCRIBE_CHUNK):
            chunk = keys[start:start + RESUBSCRIBE_CHUNK]
            command = next(self._counter)
            entries = [_Pending(_SUBSCRIBE, key, command) for key in chunk]
            entries[-1].future = loop.create_future()
            futures.append(entries[-1].future)
            async with link.lock:
                await self._write(link, entries, b"SUBSCRIBE", *chunk)
        for future in futures:
            failure = await future
            if failure is not None:
                raise BackplaneUnavailable(failure)

    async def _close_link(self, link: _Link, reason: str, *, notify: bool) -> None:
        """Forget ``link``, stop its tasks and close its socket."""
        self._lose(link, reason, notify=notify)
        current = asyncio.current_task()
        tasks = [task for task in link.tasks if task is not current]
        for task in tasks:
            task.cancel()
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            # Even when stop() cancels us right here: never leak the socket.
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await link.conn.disconnect()

    def _lose(self, link: _Link, reason: str, *, notify: bool = True) -> None:
        """Mark ``link`` dead at once: fail its waiters, flip the state (synchronous)."""
        if link.dead:
            return
        link.dead = True
        if self._link is link:
            self._link = None
        for pending in link.fifo:
            if pending.future is not None and not pending.future.done():
                pending.future.set_result(reason)
        link.fifo.clear()
        link.lost.set()
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

    # -- the subscriber connection -----------------------------------------

    async def _write(self, link: _Link, expected: list[_Pending], *args: bytes) -> None:
        """Queue the replies ``args`` will get, then send it; hold ``link.lock``.

        Queuing and writing under one lock keeps the FIFO in wire order. The
        connection must not reconnect behind our back (redis-py would on a
        closed socket), so a closed one fails the link instead.
        """
        if link.dead or not link.conn.is_connected:
            self._lose(link, "the subscriber connection is closed")
            raise BackplaneUnavailable("Redis is unavailable")
        link.fifo.extend(expected)
        try:
            await link.conn.send_packed_command(link.conn.pack_command(*args),
                                                check_health=False)
        except (RedisError, OSError) as exc:
            self._lose(link, f"write failed: {exc}")
            raise BackplaneUnavailable("Redis is unavailable") from exc

    async def _read(self, link: _Link) -> None:
        """Read every reply on the subscriber connection until it fails."""
        conn = link.conn
        names = self._names
        on_message = self._on_message
        batch = 0
        try:
            while True:
                try:
                    # math.inf: block with no timeout (see the module docstring).
                    reply = await conn.read_response(
                        timeout=math.inf, disconnect_on_error=False, push_request=True
                    )
                except ResponseError as exc:
                    link.received += 1
                    self._fail_command(link, str(exc))
                    continue
                link.received += 1
                if type(reply) is not bytes and reply[0] == _MESSAGE:
                    channel = names.get(reply[1])
                    if channel is not None:
                        try:
                            on_message(channel, reply[2])
                        except Exception:
                            log.exception("the backplane message handler failed")
                    batch += 1
                    if batch >= YIELD_EVERY:
                        # A burst already in the buffer is read with no real
                        # await; let other tasks (socket writers) run now and then.
                        batch = 0
                        await asyncio.sleep(0)
                else:
                    await self._confirm(link, reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._lose(link, f"read failed: {exc!r}")

    async def _confirm(self, link: _Link, reply: Any) -> None:
        """Match a (un)subscribe or PING reply with the head of the FIFO."""
        if isinstance(reply, bytes):  # PONG outside subscribed mode
            kind, channel = (_PONG, None) if reply == b"PONG" else (reply, None)
        else:
            kind, channel = reply[0], reply[1]
        head = link.fifo.popleft() if link.fifo else None
        if (head is None or head.kind != kind
                or (kind != _PONG and head.channel != channel)):
            raise ConnectionError(f"unexpected reply {reply!r} on the subscriber connection")
        if head.future is not None and not head.future.done():
            head.future.set_result(None)
        if kind == _SUBSCRIBE and isinstance(channel, bytes) and channel not in self._names:
            # Confirmed, but nobody wants it any more (its subscribe call was
            # cancelled or unsubscribed during a reconnect): drop it.
            async with link.lock:
                if channel not in self._names and not link.dead:
                    await self._write(link, [_Pending(_UNSUBSCRIBE, channel, 0)],
                                      b"UNSUBSCRIBE", channel)

    def _fail_command(self, link: _Link, error: str) -> None:
        """An error reply answers a whole command: fail all its expected replies."""
        if not link.fifo:
            raise ConnectionError(f"unexpected error reply {error!r}")
        head = link.fifo.popleft()
        failed = [head]
        while head.command and link.fifo and link.fifo[0].command == head.command:
            failed.append(link.fifo.popleft())
        for pending in failed:
            if pending.future is not None and not pending.future.done():
                pending.future.set_result(f"Redis refused: {error}")

    async def _watch(self, link: _Link) -> None:
        """PING the subscriber connection when it has been quiet; no answer → lost."""
        try:
            while True:
                seen = link.received
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.ping_interval):
                        await link.poke.wait()
                poked = link.poke.is_set()
                link.poke.clear()
                if link.received != seen and not poked:
                    continue
                # Replies come in order, so the PONG also proves that everything
                # queued before it was read.
                pong: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
                try:
                    async with asyncio.timeout(self.ping_timeout):
                        async with link.lock:
                            await self._write(link, [_Pending(_PONG, None, 0, pong)], b"PING")
                        await pong
                except TimeoutError:
                    self._lose(link, f"no reply to PING within {self.ping_timeout:g} s")
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._lose(link, f"health check failed: {exc!r}")
