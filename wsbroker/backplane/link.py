"""The subscriber link both Redis engines share: one connection, its reader, its watchdog.

The Redis engine (classic pub/sub) keeps one link; the Redis Cluster engine
(sharded pub/sub) keeps one per master. What differs between them is a
:class:`Dialect` (command names, channels per command, MOVED) and a few
:class:`Hooks` (which channels are wanted, what a lost link means).

Timeouts (the constants below): no read timeout on the subscriber, which is
PINGed after ``ping_interval`` of silence and lost after ``ping_timeout`` more;
connect 3 s, connect + handshake + re-subscribe 10 s; publish 3 s, no redis-py
retries, on a blocking pool of :data:`PUBLISH_POOL_SIZE`; reconnect backoff
100 ms doubling to 5 s with equal jitter. Why each is what it is is told once,
for users and readers alike: README.md, "Redis connection settings".

Design: one reader task owns the subscriber connection and reads every reply.
Redis answers (S)SUBSCRIBE/(S)UNSUBSCRIBE/PING in the order they were sent, so
each command we write queues what it expects in a FIFO; the reader pops the FIFO
and resolves the waiter. ``subscribe`` therefore returns only once Redis
confirmed the subscription, which is what SPEC §4's delivery guarantee needs.
Messages are handed to the synchronous ``on_message`` handler straight from the
reader, with no per-message task or await: one ``read_response`` per read of the
socket, the other replies that read brought taken from hiredis synchronously
(:func:`buffered_replies`). The subscriber speaks RESP2 whatever
the URL says (redis-py 8 defaults to RESP3, where pub/sub replies go through a
push handler that logs every message). If the node reads slower than Redis
publishes, Redis's ``client-output-buffer-limit pubsub`` cuts the connection:
that is handled like any loss (reconnect, re-subscribe; messages in between are
not replayed).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import MovedError, RedisError, ResponseError

from wsbroker.backplane.base import BackplaneUnavailable, MessageHandler

CONNECT_TIMEOUT = 3.0
SETUP_TIMEOUT = 10.0
PUBLISH_TIMEOUT = 3.0
CONFIRM_TIMEOUT = 5.0
BACKOFF_BASE = 0.1
BACKOFF_CAP = 5.0
RESUBSCRIBE_CHUNK = 1000
PUBLISH_POOL_SIZE = 32
YIELD_EVERY = 1000
SUB_READ_SIZE = 16 * 1024

PONG = b"pong"

_commands = itertools.count(1)  # ids that tie a multi-channel command's replies together


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


def client_options(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """redis-py options of (the subscriber, the publishers) of node ``name``.

    The subscriber connection is built directly, not through a pool: it speaks
    RESP2 (pub/sub replies are plain arrays, no push handlers, no
    maintenance-notification reconnects behind our back) and these options win
    over the URL's query string. TCP keepalive is on by default in redis-py 8
    (30 s idle, 3 probes 5 s apart). ``socket_read_size`` is how much redis-py
    moves from the stream's buffer into hiredis at a time (the socket itself is
    read by the event loop's transport): hiredis moves its unread bytes forward
    each time a reply takes it past 1 KiB, so a 256 KiB chunk cost about 0.3 µs
    more per 100-byte message than a 16 KiB one (benchmarks/subscriber_read.py).
    """
    common: dict[str, Any] = {
        "decode_responses": False,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "retry": Retry(NoBackoff(), 0),  # we retry, with our backoff, or fail fast
        "health_check_interval": 0,
    }
    subscriber = {**common, "socket_timeout": None, "protocol": 2,
                  "client_name": f"wsbroker:{name}:sub", "socket_read_size": SUB_READ_SIZE}
    publisher = {**common, "socket_timeout": PUBLISH_TIMEOUT,
                 "client_name": f"wsbroker:{name}:pub"}
    return subscriber, publisher


def publishing_client(url: str, options: dict[str, Any]) -> Redis:
    """A client for PUBLISH/SPUBLISH on a bounded pool that waits rather than raises."""
    pool = BlockingConnectionPool.from_url(url, max_connections=PUBLISH_POOL_SIZE,
                                           timeout=PUBLISH_TIMEOUT, **options)
    return Redis.from_pool(pool)


def failure(error: Exception) -> str:
    """Why a command failed, for :class:`BackplaneUnavailable`."""
    return f"Redis refused: {error}" if isinstance(error, ResponseError) else str(error)


class Claims:
    """Which subscribe call last claimed each wanted channel (its Redis name).

    A subscribe that fails or is cancelled must forget its channel (the caller
    will not count it as subscribed), but only if no later subscribe call
    claimed it meanwhile: that call owns it now. If Redis confirms it after
    all, the reader unsubscribes what nobody wants.
    """

    def __init__(self, forget: Callable[[bytes], None]) -> None:
        self._tokens: dict[bytes, int] = {}
        self._counter = itertools.count(1)
        self._forget = forget
        """Drop a channel from the engine's tables (called with its claim already gone)."""

    def discard(self, key: bytes) -> None:
        self._tokens.pop(key, None)

    def clear(self) -> None:
        self._tokens.clear()

    @contextlib.contextmanager
    def attempt(self, key: bytes) -> Iterator[Callable[[], None]]:
        """One subscribe call; it calls what this yields when it adds ``key`` to its tables.

        A failure forgets ``key`` if this call still owns it; a timeout becomes
        :class:`BackplaneUnavailable`.
        """
        token = next(self._counter)
        try:
            yield functools.partial(self._tokens.__setitem__, key, token)
        except BaseException as exc:
            if self._tokens.get(key) == token:
                del self._tokens[key]
                self._forget(key)
            if isinstance(exc, TimeoutError):
                raise BackplaneUnavailable("Redis did not confirm the subscription") from None
            raise


@dataclass(frozen=True, slots=True)
class Dialect:
    """Classic or sharded pub/sub, as the subscriber link speaks it."""

    subscribe: bytes
    """The command (``SUBSCRIBE``, ``SSUBSCRIBE``); the kind of its replies is in lower case."""
    unsubscribe: bytes
    message: bytes
    """The kind of a message reply (``message``, ``smessage``)."""
    per_command: int
    """Channels per SUBSCRIBE command (sharded: one, or Redis answers CROSSSLOT)."""
    redirects: bool
    """Redis Cluster: a subscribe may be answered with MOVED (:meth:`SubscriberLink.refused`)."""

    @property
    def subscribed(self) -> bytes:
        return self.subscribe.lower()

    @property
    def unsubscribed(self) -> bytes:
        return self.unsubscribe.lower()


CLASSIC = Dialect(b"SUBSCRIBE", b"UNSUBSCRIBE", b"message", RESUBSCRIBE_CHUNK, redirects=False)
SHARDED = Dialect(b"SSUBSCRIBE", b"SUNSUBSCRIBE", b"smessage", 1, redirects=True)


@dataclass(slots=True)
class Expect:
    """One reply a link's reader expects; ``future`` gets None, or why not (an exception)."""

    kind: bytes
    channel: bytes | None
    future: asyncio.Future[Exception | None] | None = None
    command: int = 0
    """Non-zero: one error reply answers every entry of this command at once."""
    background: bool = False
    """Written by the engine itself (re-subscribe, re-route): nobody awaits this channel."""


@dataclass(slots=True, eq=False)
class Link:
    """One subscriber connection and everything that dies with it."""

    conn: AbstractConnection
    fifo: deque[Expect] = field(default_factory=deque)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    poke: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    received: int = 0
    dead: bool = False


class PingSettings(Protocol):
    """The engine's watchdog settings, read at every check (tests tune them late)."""

    ping_interval: float
    ping_timeout: float


@dataclass(frozen=True, slots=True)
class Hooks:
    """What a link asks of its engine. None of it runs per message."""

    deliver: Callable[[], MessageHandler]
    """The engine's message handler, read when a reader starts (bound after construction)."""
    wanted: Callable[[], list[bytes]]
    """The channels to subscribe on a fresh connection."""
    wants: Callable[[bytes], bool]
    """Whether a channel Redis just confirmed is still wanted here; if not, it is dropped."""
    lost: Callable[[str, bool], None]
    """The current connection died: (reason, whether to tell the world)."""
    unasked_unsubscribe: Callable[[bytes], None] | None = None
    """Redis dropped a channel by itself (a slot moved); None: that is a protocol error."""
    moved: Callable[[bytes, MovedError], None] | None = None
    """A background subscribe of a channel was answered with MOVED."""


def buffered_replies(conn: AbstractConnection) -> tuple[Callable[[], Any], object] | None:
    """``(gets, pending)``: take the replies redis-py's hiredis reader already holds.

    redis-py reads the socket in chunks (``socket_read_size``) into a
    ``hiredis.Reader`` and returns one reply per ``read_response``, a chain of
    coroutines per reply even when the rest of a burst is already in that
    reader. ``gets()`` takes the next complete reply from it with no
    await; it returns ``pending`` when the reader holds no complete reply (then
    it is time for ``read_response``, which reads the socket).

    The one private API the subscriber uses: the connection's parser's hiredis
    reader, ``conn._parser._reader``. ``pending`` (redis-py's not-enough-data
    sentinel) is learned from the reader itself: call this on a connection
    whose replies so far were all read, i.e. before the reader task's first
    read, when ``gets()`` on the empty reader returns it and consumes nothing.
    Replies on a RESP2 subscriber connection are arrays, strings and errors,
    so it cannot be mistaken for one. None, and the caller reads every reply
    with ``read_response``, when any of this is not so: no hiredis (redis-py's
    pure-Python parser), another redis-py layout, RESP3, unread data.
    """
    try:
        import hiredis
    except ImportError:
        return None
    reader = getattr(getattr(conn, "_parser", None), "_reader", None)
    if (not isinstance(reader, hiredis.Reader) or str(getattr(conn, "protocol", 2)) != "2"
            or reader.has_data()):
        return None
    pending = reader.gets()
    if isinstance(pending, list | bytes | Exception):
        return None  # not a sentinel: cannot happen with no data, but never guess
    return reader.gets, pending


class SubscriberLink:
    """Successive subscriber connections to one Redis: write, read and match, watch, lose."""

    def __init__(self, dialect: Dialect, hooks: Hooks, *,
                 connect: Callable[[], AbstractConnection], names: dict[bytes, str],
                 timing: PingSettings, name: str, tag: str, log: logging.Logger) -> None:
        self.link: Link | None = None
        """The current connection; set once connected, None once lost."""
        self._dialect = dialect
        self._hooks = hooks
        self._connect = connect
        self._names = names  # the engine's Redis name → our name: the readers' lookup table
        self._timing = timing
        self._name = name
        self._unavailable = f"{name} is unavailable"
        self._tag = tag
        self._log = log

    # -- life cycle ------------------------------------------------------------

    async def open(self) -> Link:
        """A connected, confirmed link holding every wanted channel."""
        link = Link(self._connect())
        try:
            async with asyncio.timeout(SETUP_TIMEOUT):
                await link.conn.connect()  # type: ignore[no-untyped-call]
                # From here the engine writes on this link.
                self.link = link
                link.tasks.append(asyncio.create_task(self._read(link), name=f"{self._tag}-read"))
                link.tasks.append(asyncio.create_task(self._watch(link), name=f"{self._tag}-ping"))
                await self._resubscribe(link)
        except BaseException:
            await self.close(link, "cannot set up the subscriber link", notify=False)
            raise
        return link

    async def _resubscribe(self, link: Link) -> None:
        """Subscribe every wanted channel, pipelined in chunks, and await the last reply."""
        keys = self._hooks.wanted()
        futures: list[asyncio.Future[Exception | None]] = []
        loop = asyncio.get_running_loop()
        for start in range(0, len(keys), RESUBSCRIBE_CHUNK):
            future: asyncio.Future[Exception | None] = loop.create_future()
            futures.append(future)
            async with link.lock:
                await self.subscribe_many(link, keys[start:start + RESUBSCRIBE_CHUNK], future)
        for future in futures:
            error = await future
            # MOVED is handled by the reader (the moved hook re-routes); anything else is fatal.
            if error is not None and not (self._dialect.redirects
                                          and isinstance(error, MovedError)):
                raise BackplaneUnavailable(failure(error))

    def poke(self) -> None:
        """Check the connection now rather than after ``ping_interval`` of silence."""
        if self.link is not None:
            self.link.poke.set()

    async def stop(self) -> None:
        """Close the current connection, if any, without telling the engine."""
        if self.link is not None:
            await self.close(self.link, "backplane stopped", notify=False)

    async def close(self, link: Link, reason: str, *, notify: bool) -> None:
        """Forget ``link``, stop its tasks and close its socket."""
        self.lose(link, reason, notify=notify)
        current = asyncio.current_task()
        tasks = [task for task in link.tasks if task is not current]
        for task in tasks:
            task.cancel()
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            # Even when the engine is stopped right here: never leak the socket.
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await link.conn.disconnect()

    def lose(self, link: Link, reason: str, *, notify: bool = True) -> None:
        """Mark ``link`` dead at once: fail its waiters, tell the engine (synchronous)."""
        if link.dead:
            return
        link.dead = True
        if self.link is link:
            self.link = None
        error = ConnectionError(reason)
        for expect in link.fifo:
            if expect.future is not None and not expect.future.done():
                expect.future.set_result(error)
        link.fifo.clear()
        link.lost.set()
        self._hooks.lost(reason, notify)

    async def drop(self, key: bytes, channel: str) -> None:
        """Unsubscribe ``key``, which the engine already forgot, and await Redis's answer.

        Never fails: if the connection is dying the subscription dies with it.
        Nothing is sent while down (the link holds nothing and will not re-subscribe
        ``key``), nor if ``key`` is wanted here again by the time we hold the lock
        (a subscribe came in between; ``Hooks.wants``, as for a late confirmation).
        """
        link = self.link
        if link is None:
            return
        future: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(CONFIRM_TIMEOUT):
                async with link.lock:
                    if link.dead or self._hooks.wants(key):
                        return
                    await self.unsubscribe(link, key, future)
                await future
        except (BackplaneUnavailable, TimeoutError):
            self._log.debug("%s %s not confirmed; the connection is going away",
                            self._dialect.unsubscribed.decode(), channel)

    # -- writing (the caller holds link.lock) ------------------------------------

    async def subscribe(self, link: Link, key: bytes,
                        future: asyncio.Future[Exception | None]) -> None:
        """Subscribe one channel; ``future`` gets Redis's answer."""
        dialect = self._dialect
        await self.write(link, [Expect(dialect.subscribed, key, future)], dialect.subscribe, key)

    async def unsubscribe(self, link: Link, key: bytes,
                          future: asyncio.Future[Exception | None] | None = None) -> None:
        """Unsubscribe one channel; ``future`` gets Redis's answer."""
        dialect = self._dialect
        await self.write(link, [Expect(dialect.unsubscribed, key, future)],
                         dialect.unsubscribe, key)

    async def subscribe_many(self, link: Link, keys: list[bytes],
                             last: asyncio.Future[Exception | None] | None) -> None:
        """Subscribe ``keys``, pipelined, as the engine's own; ``last`` gets the last reply."""
        if not keys:
            if last is not None:
                last.set_result(None)
            return
        dialect = self._dialect
        kind = dialect.subscribed
        pack = link.conn.pack_command
        expected: list[Expect] = []
        packed: list[bytes] = []
        for start in range(0, len(keys), dialect.per_command):
            chunk = keys[start:start + dialect.per_command]
            command = next(_commands)
            expected += [Expect(kind, key, command=command, background=True) for key in chunk]
            packed += pack(dialect.subscribe, *chunk)
        expected[-1].future = last
        await self._send(link, expected, packed)

    async def write(self, link: Link, expected: list[Expect], *args: bytes) -> None:
        """Queue the replies the command ``args`` will get, then send it."""
        await self._send(link, expected, link.conn.pack_command(*args))

    async def _send(self, link: Link, expected: list[Expect], packed: list[bytes]) -> None:
        # Queuing and writing under one lock keeps the FIFO in wire order. The
        # connection must not reconnect behind our back (redis-py would on a
        # closed socket), so a closed one fails the link instead.
        if link.dead or not link.conn.is_connected:
            self.lose(link, "the subscriber connection is closed")
            raise BackplaneUnavailable(self._unavailable)
        link.fifo.extend(expected)
        try:
            await link.conn.send_packed_command(packed, check_health=False)
        except (RedisError, OSError) as exc:
            self.lose(link, f"write failed: {exc}")
            raise BackplaneUnavailable(self._unavailable) from exc

    # -- reading -------------------------------------------------------------------

    async def _read(self, link: Link) -> None:
        """Read every reply on the connection until it fails.

        One ``read_response`` per read of the socket, not per reply: what that
        read brought beyond the first reply is taken from hiredis synchronously
        (:func:`buffered_replies`). After anything that awaits (a confirmation
        may write, the cooperative yield) the next reply comes from
        ``read_response`` again, which checks the connection first.
        """
        conn = link.conn
        names = self._names
        on_message = self._hooks.deliver()
        message = self._dialect.message
        log = self._log
        gets, pending = buffered_replies(conn) or (None, None)
        batch = 0
        try:
            while True:
                try:
                    # math.inf: block with no timeout (see the module docstring).
                    reply: Any = await conn.read_response(
                        timeout=math.inf, disconnect_on_error=False, push_request=True
                    )
                except ResponseError as exc:
                    reply = exc
                while True:
                    link.received += 1
                    if type(reply) is list and reply[0] == message:
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
                            break
                    elif isinstance(reply, ResponseError):
                        self.refused(link, reply)
                    elif isinstance(reply, Exception):
                        raise reply  # as read_response raises a ConnectionError reply
                    else:
                        await self.confirm(link, reply)
                        break
                    if gets is None:
                        break
                    reply = gets()
                    if reply is pending:
                        break
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.lose(link, f"read failed: {exc!r}")

    async def confirm(self, link: Link, reply: Any) -> None:
        """Match a (un)subscribe or PING reply with the head of the FIFO."""
        dialect = self._dialect
        if isinstance(reply, bytes):  # PONG outside subscribed mode
            kind, channel = (PONG, None) if reply == b"PONG" else (reply, None)
        else:
            kind, channel = reply[0], reply[1]
        head = link.fifo[0] if link.fifo else None
        unasked = self._hooks.unasked_unsubscribe
        if unasked is not None and kind == dialect.unsubscribed and (
                head is None or head.kind != kind or head.channel != channel):
            # Not asked for: Redis dropped the channel itself (its slot moved).
            if isinstance(channel, bytes):
                unasked(channel)
            return
        if (head is None or head.kind != kind
                or (kind != PONG and head.channel != channel)):
            raise ConnectionError(f"unexpected reply {reply!r} on the subscriber connection")
        link.fifo.popleft()
        if head.future is not None and not head.future.done():
            head.future.set_result(None)
        wants = self._hooks.wants
        if kind == dialect.subscribed and isinstance(channel, bytes) and not wants(channel):
            # Confirmed, but nobody wants it here any more (its subscribe call was
            # cancelled, or it was unsubscribed or moved meanwhile): drop it.
            async with link.lock:
                if not wants(channel) and not link.dead:
                    await self.unsubscribe(link, channel)

    def refused(self, link: Link, error: ResponseError) -> None:
        """An error reply answers the command at the head of the FIFO (all its channels).

        One exception, in Redis Cluster: when a slot moves while we unsubscribe
        one of its channels, Redis's own ``sunsubscribe`` push can take our
        command's place in the FIFO, and the MOVED that then answers our
        SUNSUBSCRIBE has no entry left. A MOVED for another slot than the
        head's channel (or for a head that is a PING, or no head) is that stray
        reply: skip it.
        """
        fifo = link.fifo
        head = fifo[0] if fifo else None
        if self._dialect.redirects and isinstance(error, MovedError) and (
                head is None or head.channel is None
                or key_slot(head.channel) != int(error.slot_id)):
            self._log.debug("skipped a stray MOVED on %s: %s", self._name, error)
            return
        if head is None:
            raise ConnectionError(f"unexpected error reply {error!r}")
        failed = [fifo.popleft()]
        while head.command and fifo and fifo[0].command == head.command:
            failed.append(fifo.popleft())
        for expect in failed:
            if expect.future is not None and not expect.future.done():
                expect.future.set_result(error)
        moved = self._hooks.moved
        if (moved is not None and head.background and isinstance(error, MovedError)
                and head.kind == self._dialect.subscribed and head.channel is not None):
            moved(head.channel, error)

    # -- the watchdog ----------------------------------------------------------------

    async def _watch(self, link: Link) -> None:
        """PING the connection when it has been quiet; no answer → lost."""
        timing = self._timing
        try:
            while True:
                seen = link.received
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timing.ping_interval):
                        await link.poke.wait()
                poked = link.poke.is_set()
                link.poke.clear()
                if link.received != seen and not poked:
                    continue
                # Replies come in order, so the PONG also proves that everything
                # queued before it was read.
                pong: asyncio.Future[Exception | None] = asyncio.get_running_loop(
                    ).create_future()
                try:
                    async with asyncio.timeout(timing.ping_timeout):
                        async with link.lock:
                            await self.write(link, [Expect(PONG, None, pong)], b"PING")
                        await pong
                except TimeoutError:
                    self.lose(link, f"no reply to PING within {timing.ping_timeout:g} s")
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.lose(link, f"health check failed: {exc!r}")


async def supervise(sub: SubscriberLink, *, target: str, log: logging.Logger,
                    failed: Callable[[], None], connected: Callable[[int, bool], None]) -> None:
    """Connect, serve until the connection is lost, back off, repeat (until cancelled).

    ``failed()`` follows each failed attempt; ``connected(failures, again)``
    each success, with the failed attempts before it and whether it is a
    reconnect.
    """
    loop = asyncio.get_running_loop()
    attempt = 0
    failures = 0
    connected_before = False
    while True:
        try:
            link = await sub.open()
        except Exception as exc:
            expected = isinstance(exc, RedisError | OSError | TimeoutError |
                                  BackplaneUnavailable)
            # Say it once, then every 10th attempt (about every 50 s at the cap).
            loud = failures % 10 == 0 or not expected
            log.log(logging.WARNING if loud else logging.DEBUG,
                    "cannot connect to %s: %s; retrying with backoff",
                    target, str(exc) or type(exc).__name__, exc_info=not expected)
            failures += 1
            failed()
            await asyncio.sleep(backoff_delay(attempt))
            attempt += 1
            continue
        since = loop.time()
        connected(failures, connected_before)
        failures = 0
        connected_before = True
        try:
            await link.lost.wait()
        finally:
            await sub.close(link, "backplane stopped", notify=False)
        if loop.time() - since >= BACKOFF_CAP:
            attempt = 0  # it was a healthy connection: start the backoff afresh
        await asyncio.sleep(backoff_delay(attempt))
        attempt += 1
