"""Fleet-wide holdings: "C has a subscriber somewhere", decided once per transition.

A *subject* is what a webhook reports on: a channel (occupied / vacated) or a
user on a channel (member added / removed). Each node says when it starts and
stops holding a subject (its first local subscription arrived, its last one
left); the tracker turns that into exactly one ``started`` when the subject goes
from held by no node to held by one, and exactly one ``ended`` once no node has
held it for the vacate delay (held again within the delay: neither).

Two engines, like the backplane's: :class:`MemoryTracker` decides in the node
(in-process backplane, one node), :class:`RedisTracker` decides in Redis, where
one small script per call sees and changes a subject's whole state atomically,
so two nodes joining at the same moment cannot both see "first".
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from wsbroker.backplane.link import redact_url
from wsbroker.config import Settings
from wsbroker.logs import Throttled
from wsbroker.redis_errors import REDIS_FAILURES
from wsbroker.tasks import cancel_and_wait

log = logging.getLogger("wsbroker.webhooks")


@dataclass(frozen=True, slots=True)
class Subject:
    """A channel (``user`` None: occupancy) or a user on a channel (membership)."""

    channel: str
    user: str | None = None

    @property
    def key(self) -> str:
        """A string naming the subject; channel names never contain ``|``."""
        return f"occ|{self.channel}" if self.user is None else f"mem|{self.channel}|{self.user}"

    @classmethod
    def from_key(cls, key: str) -> Subject:
        kind, channel, *user = key.split("|", 2)
        return cls(channel, user[0] if kind == "mem" else None)


Transition = Callable[[Subject, int], None]
"""Called with the subject and when the transition happened (Unix ms): with Redis,
Redis's clock, so one channel's events are in order whichever node reports them."""


class Tracker(abc.ABC):
    """Calls ``on_start``/``on_end`` once per fleet-wide transition of a subject.

    :meth:`hold` and :meth:`release` never block and never raise: the hub calls
    them on the subscribe path. Each node calls them paired, once per subject,
    however many local subscriptions it has.
    """

    def __init__(self, delay: float, on_start: Transition, on_end: Transition) -> None:
        self.delay = delay
        self._on_start = on_start
        self._on_end = on_end

    @property
    @abc.abstractmethod
    def settled(self) -> bool:
        """Nothing queued or waiting here: no event will come without a new hold/release."""

    @abc.abstractmethod
    def hold(self, subject: Subject) -> None:
        """This node holds ``subject`` now."""

    @abc.abstractmethod
    def release(self, subject: Subject) -> None:
        """This node no longer holds ``subject``."""

    async def start(self) -> None:  # noqa: B027 - most engines have nothing to start
        """Begin background work (refreshing, sweeping)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop; what this node still had to report is handed on (or lost, if nobody can)."""


class MemoryTracker(Tracker):
    """One node is the whole fleet: a set of started subjects and a timer per vacancy."""

    def __init__(self, delay: float, on_start: Transition, on_end: Transition) -> None:
        super().__init__(delay, on_start, on_end)
        self._started: set[Subject] = set()
        self._vacancies: dict[Subject, asyncio.TimerHandle] = {}

    @property
    def settled(self) -> bool:
        return not self._vacancies

    def hold(self, subject: Subject) -> None:
        timer = self._vacancies.pop(subject, None)
        if timer is not None:
            timer.cancel()  # re-occupied within the delay: neither event
        if subject not in self._started:
            self._started.add(subject)
            self._on_start(subject, _now_ms())

    def release(self, subject: Subject) -> None:
        if subject in self._started and subject not in self._vacancies:
            loop = asyncio.get_running_loop()
            self._vacancies[subject] = loop.call_later(self.delay, self._end, subject)

    def _end(self, subject: Subject) -> None:
        del self._vacancies[subject]
        self._started.discard(subject)
        self._on_end(subject, _now_ms())

    async def close(self) -> None:
        """The fleet ends with this node: vacancies it was waiting on end now."""
        for subject, timer in list(self._vacancies.items()):
            timer.cancel()
            self._end(subject)


# -- Redis ----------------------------------------------------------------------------

# Keys of a subject live in its channel's cluster slot (hash tag {<prefix>C}):
#   holders  ZSET  node id → expiry (ms, Redis clock); a live node refreshes its entry
#   state    HASH  started=1 while a start was reported and its end not yet;
#                  empty_since=ms while no node holds the subject
# plus one fleet-wide ZSET "due": subject → when someone should look at it again
# (a vacancy that may be over, or a holder entry that may have expired because
# its node died). Times come from Redis (TIME), so node clocks need not agree.
_PRELUDE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Drop expired holders. Returns 1 when the subject has been held by nobody for
-- `delay` ms while a start is outstanding: the end is claimed here, once.
local function settle(holders, state, now, delay)
  local expired = redis.call('ZRANGEBYSCORE', holders, '-inf', now, 'WITHSCORES')
  if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', holders, '-inf', now)
  end
  if redis.call('ZCARD', holders) > 0 or redis.call('HEXISTS', state, 'started') == 0 then
    return 0
  end
  local since = tonumber(redis.call('HGET', state, 'empty_since'))
  if not since then
    since = now
    if #expired > 0 then since = tonumber(expired[#expired]) end
    redis.call('HSET', state, 'empty_since', since)
  end
  if now >= since + delay then
    redis.call('DEL', state)
    return 1
  end
  return 0
end

-- When to look again: the first holder expiry, or the end of the vacancy; 0: never.
local function next_check(holders, state, delay)
  if redis.call('EXISTS', state) == 0 then return 0 end
  local first = redis.call('ZRANGE', holders, 0, 0, 'WITHSCORES')
  if #first > 0 then return tonumber(first[2]) end
  local since = tonumber(redis.call('HGET', state, 'empty_since'))
  if since then return since + delay end
  return 0
end

local function keep(keys, ms)
  redis.call('PEXPIRE', keys[1], ms)
  if redis.call('EXISTS', keys[2]) == 1 then redis.call('PEXPIRE', keys[2], ms) end
end
"""

# KEYS holders, state; ARGV node, ttl ms, delay ms, keep ms → {ended, started, now, next}
_HOLD = _PRELUDE + """
local now = now_ms()
local ended = settle(KEYS[1], KEYS[2], now, tonumber(ARGV[3]))
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HDEL', KEYS[2], 'empty_since')
local started = redis.call('HSETNX', KEYS[2], 'started', 1)
keep(KEYS, ARGV[4])
return {ended, started, now, next_check(KEYS[1], KEYS[2], tonumber(ARGV[3]))}
"""

# KEYS holders, state; ARGV node, delay ms, keep ms → {ended, 0, now, next}
_RELEASE = _PRELUDE + """
local now = now_ms()
redis.call('ZREM', KEYS[1], ARGV[1])
local ended = settle(KEYS[1], KEYS[2], now, tonumber(ARGV[2]))
keep(KEYS, ARGV[3])
return {ended, 0, now, next_check(KEYS[1], KEYS[2], tonumber(ARGV[2]))}
"""

# KEYS holders, state; ARGV delay ms → {ended, 0, now, next}
_SETTLE = _PRELUDE + """
local now = now_ms()
local ended = settle(KEYS[1], KEYS[2], now, tonumber(ARGV[1]))
return {ended, 0, now, next_check(KEYS[1], KEYS[2], tonumber(ARGV[1]))}
"""

# KEYS due; ARGV limit → subjects due now, removed from the set (claimed by this caller)
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
if #due > 0 then redis.call('ZREM', KEYS[1], unpack(due)) end
return due
"""

CLAIM_BATCH = 200
KEEP_MARGIN = 60.0
"""Seconds a subject's keys outlive their last use, so abandoned state cleans itself up."""

REDIS_TIMEOUT = 3.0
RETRY_AFTER_FAILURE = 1.0


class RedisTracker(Tracker):
    """Holdings decided in Redis; entries expire unless their node refreshes them.

    Calls from this node run one at a time, in order, on one background task,
    so a hold and a release of the same subject reach Redis in the order they
    happened. Every ``ttl / 3`` the node re-holds what it holds (the entry of a
    node that died expires within ``ttl``). A vacancy is checked by a local
    timer when it should end, and every node also sweeps the fleet-wide "due"
    set, which covers vacancies left by nodes that died or drained.
    """

    def __init__(
        self, settings: Settings, on_start: Transition, on_end: Transition
    ) -> None:
        super().__init__(settings.webhook_vacate_delay, on_start, on_end)
        if not settings.redis_url:
            raise ValueError("the Redis tracker needs --redis-url")
        self._url = settings.redis_url
        options: dict[str, Any] = dict(socket_timeout=REDIS_TIMEOUT,
                                       socket_connect_timeout=REDIS_TIMEOUT)
        self._redis: Redis | RedisCluster
        if settings.redis_cluster:
            self._redis = RedisCluster.from_url(self._url, **options)
        else:
            self._redis = Redis.from_url(self._url, **options)
        self._prefix = settings.redis_prefix
        self._node = re.sub(r"\s", "_", settings.node_id)
        self._ttl_ms = int(settings.presence_ttl * 1000)
        self._delay_ms = int(self.delay * 1000)
        self._keep_ms = int((settings.presence_ttl + self.delay + KEEP_MARGIN) * 1000)
        self.refresh_every = settings.presence_ttl / 3
        self.sweep_every = min(1.0, max(0.05, settings.presence_ttl / 10))
        self._due_key = f"{self._prefix}webhook-due"
        self._hold = self._redis.register_script(_HOLD)
        self._release = self._redis.register_script(_RELEASE)
        self._settle = self._redis.register_script(_SETTLE)
        self._claim = self._redis.register_script(_CLAIM)
        self._held: set[Subject] = set()
        self._ops: collections.deque[tuple[str, Subject | None]] = collections.deque()
        self._wake = asyncio.Event()
        self._timers: dict[Subject, asyncio.TimerHandle] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._log_failure = Throttled(log, logging.WARNING)
        self._busy = False
        self._closing = False
        self._unsure: set[Subject] = set()  # holds that failed: repeated a second later
        self._retrying: asyncio.TimerHandle | None = None

    @property
    def settled(self) -> bool:
        return not self._ops and not self._timers and not self._busy

    # -- the node's side: never blocks ------------------------------------------------

    def hold(self, subject: Subject) -> None:
        self._held.add(subject)
        self._queue("hold", subject)

    def release(self, subject: Subject) -> None:
        self._held.discard(subject)
        self._queue("release", subject)

    def _queue(self, op: str, subject: Subject | None) -> None:
        self._ops.append((op, subject))
        self._wake.set()

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._work(), name="wsbroker-webhook-tracker"),
            asyncio.create_task(self._every(self.refresh_every, self._refresh),
                                name="wsbroker-webhook-refresh"),
            asyncio.create_task(self._every(self.sweep_every, lambda: self._queue("sweep", None)),
                                name="wsbroker-webhook-sweep"),
        ]

    async def close(self) -> None:
        """Send the releases still queued (bounded), then stop; vacancies are left to
        the other nodes' sweeps (or the next node to start)."""
        self._closing = True
        tasks, self._tasks = self._tasks, []
        for task in tasks[1:]:
            await cancel_and_wait(task)
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self._retrying is not None:
            self._retrying.cancel()
        self._ops = collections.deque(op for op in self._ops if op[0] in ("hold", "release"))
        if tasks:
            worker = tasks[0]
            self._queue("stop", None)
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(REDIS_TIMEOUT):
                    await asyncio.shield(worker)
            await cancel_and_wait(worker)
        await self._redis.aclose()

    async def _every(self, period: float, action: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(period * random.uniform(0.9, 1.1))
            action()

    def _refresh(self) -> None:
        for subject in self._held:
            self._queue("refresh", subject)

    # -- the worker: one Redis call at a time, in order --------------------------------

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._ops:
                op, subject = self._ops.popleft()
                if op == "stop":
                    return
                self._busy = True
                try:
                    await self._apply(op, subject)
                except REDIS_FAILURES as exc:
                    self._failed(op, subject, exc)
                except Exception:
                    log.exception("webhook tracking failed on %s", op)
                finally:
                    self._busy = False

    async def _apply(self, op: str, subject: Subject | None) -> None:
        if op == "sweep":
            await self._sweep()
            return
        assert subject is not None
        if op == "refresh" and subject not in self._held:
            return  # released since: the release is queued or done
        keys = self._keys(subject)
        if op in ("hold", "refresh"):
            reply = await self._hold(keys, [self._node, self._ttl_ms, self._delay_ms,
                                            self._keep_ms])
        elif op == "release":
            reply = await self._release(keys, [self._node, self._delay_ms, self._keep_ms])
        else:
            reply = await self._settle(keys, [self._delay_ms])
        await self._outcome(subject, reply)

    async def _outcome(self, subject: Subject, reply: list[int]) -> None:
        ended, started, now, next_check = (int(value) for value in reply)
        if ended:
            self._on_end(subject, now)
        if started:
            self._on_start(subject, now)
        if next_check:
            await self._redis.zadd(self._due_key, {subject.key: next_check}, lt=True)
            if next_check - now <= self._delay_ms:  # a vacancy: look at it on time
                self._check_later(subject, (next_check - now) / 1000 + 0.01)

    async def _sweep(self) -> None:
        claimed = await self._claim([self._due_key], [CLAIM_BATCH])
        for key in claimed:
            subject = Subject.from_key(key.decode() if isinstance(key, bytes) else str(key))
            try:
                await self._outcome(subject, await self._settle(self._keys(subject),
                                                                [self._delay_ms]))
            except REDIS_FAILURES as exc:
                self._failed("settle", subject, exc)
        if len(claimed) == CLAIM_BATCH:
            self._queue("sweep", None)  # more are due

    def _check_later(self, subject: Subject, delay: float) -> None:
        if self._closing:
            return  # the due set has it: another node (or the next to start) will look
        timer = self._timers.pop(subject, None)
        if timer is not None:
            timer.cancel()
        self._timers[subject] = asyncio.get_running_loop().call_later(
            max(delay, 0.0), self._check_now, subject)

    def _check_now(self, subject: Subject) -> None:
        self._timers.pop(subject, None)
        self._queue("settle", subject)

    def _failed(self, op: str, subject: Subject | None, exc: Exception) -> None:
        """Redis is unreachable: try again later; nothing here blocks the node.

        A failed hold is repeated (by a refresh a second later); a failed
        release needs nothing, the entry expires; a claimed check is retried.
        """
        self._log_failure(
            "webhook tracking: {count} Redis call(s) failed in the last 10 s at %s "
            "(latest: %s on %s); retrying", redact_url(self._url), exc, op)
        if subject is None:
            return
        if self._closing:
            return
        if op in ("hold", "refresh"):
            self._unsure.add(subject)
            if self._retrying is None:
                self._retrying = asyncio.get_running_loop().call_later(
                    RETRY_AFTER_FAILURE, self._retry_holds)
        elif op == "settle":
            self._check_later(subject, RETRY_AFTER_FAILURE)

    def _retry_holds(self) -> None:
        self._retrying = None
        unsure, self._unsure = self._unsure, set()
        for subject in unsure:
            self._queue("refresh", subject)

    def _keys(self, subject: Subject) -> list[str]:
        tag = "{" + self._prefix + subject.channel + "}"
        rest = "occ" if subject.user is None else "mem:" + subject.user
        return [f"{tag}:webhook-holders:{rest}", f"{tag}:webhook-state:{rest}"]


def _now_ms() -> int:
    return int(time.time() * 1000)


def create_tracker(settings: Settings, on_start: Transition, on_end: Transition) -> Tracker:
    """The engine that matches the backplane: Redis when a URL is set."""
    if settings.redis_url:
        return RedisTracker(settings, on_start, on_end)
    return MemoryTracker(settings.webhook_vacate_delay, on_start, on_end)
