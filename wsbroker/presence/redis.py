"""The Redis presence store, for one Redis and for a Redis Cluster alike.

Channel ``C``'s members live in three keys that share the hash tag
``{<prefix>C}``, so they sit in the cluster slot of the channel's own pub/sub
name ``<prefix>C`` and one script can touch all three on any deployment:

* ``{<prefix>C}:presence`` — hash, client id → the member's JSON;
* ``{<prefix>C}:presence:expiry`` — sorted set, client id → expiry (ms, Redis clock);
* ``{<prefix>C}:presence:users`` — hash, user → number of that user's members,
  so ``presence_stats`` is two ``HLEN`` and never a scan.

Every change is one Lua script, atomic, timed by Redis's own ``TIME`` (nodes'
clocks never matter). Readers first delete the entries whose expiry passed
(a node that died without cleaning up), so answers never show them. Each key
also carries a key TTL of ``--presence-ttl`` set on every write, so a channel
abandoned by every node leaves nothing behind. Memory and commands per member
are measured in ``docs/presence.md``.

Every call is a pipeline (of one, for a join or a leave) of ``EVALSHA``, sent
again as ``EVAL`` (which caches the script) when a server does not know it yet;
with a cluster, redis-py routes each call to the master of the keys' slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from wsbroker.backplane.base import BackplaneUnavailable
from wsbroker.backplane.link import client_options
from wsbroker.config import Settings
from wsbroker.logs import Throttled
from wsbroker.presence.base import Member, PresenceStats, PresenceStore

_CLOCK = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function keep_alive(ttl)
  for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, ttl) end
end
"""

_EXPIRE = """
local function drop_expired(now)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
  for _, client in ipairs(gone) do
    local entry = redis.call('HGET', KEYS[1], client)
    if entry then
      redis.call('HDEL', KEYS[1], client)
      local user = cjson.decode(entry).user
      if redis.call('HINCRBY', KEYS[3], user, -1) <= 0 then redis.call('HDEL', KEYS[3], user) end
    end
  end
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now) end
end
"""

ADD = _CLOCK + """
-- ARGV: ttl ms, client, user, member JSON
local ttl = tonumber(ARGV[1])
if redis.call('HSET', KEYS[1], ARGV[2], ARGV[4]) == 1 then
  redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
end
redis.call('ZADD', KEYS[2], now_ms() + ttl, ARGV[2])
keep_alive(ttl)
"""

REMOVE = """
-- ARGV: client, user
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  if redis.call('HINCRBY', KEYS[3], ARGV[2], -1) <= 0 then redis.call('HDEL', KEYS[3], ARGV[2]) end
end
"""

REFRESH = _CLOCK + """
-- KEYS: the three keys of each channel, channel after channel
-- ARGV: ttl ms, then per channel: its number of clients, then those clients
-- returns the ARGV positions of the clients the store no longer holds
local ttl = tonumber(ARGV[1])
local expiry = now_ms() + ttl
local missing = {}
local at = 2
for k = 1, #KEYS, 3 do
  local zset = KEYS[k + 1]
  local count = tonumber(ARGV[at])
  for i = at + 1, at + count do
    -- XX: only existing entries; CH: 0 when absent (or, rarely, unchanged)
    if redis.call('ZADD', zset, 'XX', 'CH', expiry, ARGV[i]) == 0
        and not redis.call('ZSCORE', zset, ARGV[i]) then
      missing[#missing + 1] = i
    end
  end
  at = at + count + 1
  for j = k, k + 2 do redis.call('PEXPIRE', KEYS[j], ttl) end
end
return missing
"""

EXPIRE = _CLOCK + _EXPIRE + """
drop_expired(now_ms())
"""
"""Run before every read, in the same pipeline: the read itself is a plain
``HVALS``/``HLEN``, so 10,000 members are not copied through Lua and back."""

log = logging.getLogger("wsbroker.presence.redis")

REFRESH_CHUNK = 1000
"""Clients per refresh call, over as many channels as fit (in one slot, on a
cluster): bounds how long one script holds Redis, and spares one command per
channel (redis-py spends ~70 µs per command, more than Redis does)."""

PIPELINE_MEMBERS = 10_000
"""Members refreshed per round trip: a tick's calls go pipelined, up to this many."""

MAX_IN_FLIGHT = 64
"""Script calls at once; the rest wait their turn. redis-py 8's pools refuse a
101st connection outright, so a burst of subscribes (a fleet reconnecting after
a drain) must queue here, not fail."""


class _Script:
    """A Lua script, run by its SHA1 (see :meth:`RedisPresenceStore._pipelined`)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class _RefreshCall:
    """One REFRESH script call over one or more channels, built up channel by channel.

    ``at`` maps each ARGV position (1-based, as the script answers) that holds a
    client to its (channel, member); the other positions hold the TTL and counts.
    """

    def __init__(self, ttl_ms: int) -> None:
        self.keys: list[bytes] = []
        self.args: list[bytes | int] = [ttl_ms]
        self.at: dict[int, tuple[str, Member]] = {}

    def add(self, channel: str, keys: Sequence[bytes], chunk: Sequence[Member]) -> None:
        self.keys.extend(keys)
        self.args.append(len(chunk))
        for member in chunk:
            self.args.append(member.client.encode())
            self.at[len(self.args)] = (channel, member)


class RedisPresenceStore(PresenceStore):
    """Members in Redis for the whole fleet, each with an expiry its node refreshes."""

    def __init__(self, settings: Settings) -> None:
        if not settings.redis_url:
            raise ValueError("the Redis presence store needs --redis-url")
        self._prefix = settings.redis_prefix.encode()
        self._ttl_ms = max(1, round(settings.presence_ttl * 1000))
        name = re.sub(r"[^A-Za-z0-9._:-]", "_", settings.node_id) or "node"
        _, options = client_options(name)
        options["client_name"] = f"wsbroker:{name}:presence"
        self._client: Redis | RedisCluster
        self._cluster = settings.redis_cluster
        if settings.redis_cluster:
            self._client = RedisCluster.from_url(settings.redis_url, **options)
        else:
            self._client = Redis.from_url(settings.redis_url, **options)
        self._in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._log_partial = Throttled(log, logging.WARNING)
        self._add, self._remove = _Script(ADD), _Script(REMOVE)
        self._refresh, self._expire = _Script(REFRESH), _Script(EXPIRE)

    def keys(self, channel: str) -> tuple[bytes, bytes, bytes]:
        """The channel's member hash, expiry sorted set and user-count hash."""
        tag = b"{" + self._prefix + channel.encode() + b"}:presence"
        return tag, tag + b":expiry", tag + b":users"

    async def start(self) -> None:
        return None  # redis-py connects on first use

    async def stop(self) -> None:
        await self._client.aclose()

    async def add(self, channel: str, member: Member) -> None:
        await self._run(self._add, channel, self._ttl_ms, member.client.encode(),
                        member.user.encode(), member.json)

    async def remove(self, channel: str, member: Member) -> None:
        with contextlib.suppress(BackplaneUnavailable):  # it expires within the TTL
            await self._run(self._remove, channel, member.client.encode(), member.user.encode())

    async def refresh(self, held: Mapping[str, Sequence[Member]]) -> list[tuple[str, Member]]:
        calls = self._refresh_calls(held)
        total = len(calls)
        missing: list[tuple[str, Member]] = []
        failures: list[BaseException] = []
        while calls:
            batch, size = [], 0
            while calls and size < PIPELINE_MEMBERS:
                batch.append(calls.pop())
                size += len(batch[-1].at)
            for call, reply in zip(batch, await self._refresh_batch(batch), strict=True):
                if isinstance(reply, BaseException):
                    failures.append(reply)
                else:
                    missing.extend(call.at[int(position)] for position in reply)
        if failures:
            self._log_partial("refresh failed for {count} call(s) (latest: %s); those "
                              "members are refreshed again next period", failures[-1])
            if len(failures) == total:
                raise BackplaneUnavailable(f"Redis presence: {failures[-1]}")
        return missing

    async def _refresh_batch(self, batch: list[_RefreshCall]) -> list[Any]:
        """The script's answer per call, or the exception that call met.

        On a cluster a master that is down fails the whole pipeline, so the
        calls are then sent one by one: the other shards' members stay fresh.
        """
        try:
            return await self._pipelined(self._refresh, [(call.keys, call.args)
                                                         for call in batch])
        except BackplaneUnavailable as exc:
            if not self._cluster:
                return [exc] * len(batch)
        replies = await asyncio.gather(*(self._pipelined(self._refresh, [(call.keys, call.args)])
                                         for call in batch), return_exceptions=True)
        return [reply[0] if isinstance(reply, list) else reply for reply in replies]

    def _refresh_calls(self, held: Mapping[str, Sequence[Member]]) -> list[_RefreshCall]:
        """Channels packed into calls of at most :data:`REFRESH_CHUNK` members, and on
        a cluster only channels of one slot per call (a script's keys share a slot)."""
        open_calls: dict[int, _RefreshCall] = {}
        calls: list[_RefreshCall] = []
        for channel, members in held.items():
            keys = self.keys(channel)
            group = key_slot(keys[0]) if self._cluster else 0
            for start in range(0, len(members), REFRESH_CHUNK):
                chunk = members[start : start + REFRESH_CHUNK]
                call = open_calls.get(group)
                if call is None or len(call.at) + len(chunk) > REFRESH_CHUNK:
                    call = open_calls[group] = _RefreshCall(self._ttl_ms)
                    calls.append(call)
                call.add(channel, keys, chunk)
        return calls

    async def members(self, channel: str) -> list[bytes]:
        keys = self.keys(channel)
        values: list[bytes] = (await self._pipelined(
            self._expire, [(keys, ())], then=[("HVALS", keys[0])]))[-1]
        return values

    async def stats(self, channel: str) -> PresenceStats:
        keys = self.keys(channel)
        clients, users = (await self._pipelined(
            self._expire, [(keys, ())], then=[("HLEN", keys[0]), ("HLEN", keys[2])]))[-2:]
        return PresenceStats(int(clients), int(users))

    async def _pipelined(
        self, script: _Script, calls: list[tuple[Sequence[bytes], Sequence[bytes | int]]],
        then: Sequence[tuple[str, bytes]] = (),
    ) -> list[Any]:
        """One round trip (per master, on a cluster): ``script`` calls, then commands."""
        try:
            async with self._in_flight:
                try:
                    return await self._pipeline(script.sha, calls, then, by_sha=True)
                except NoScriptError:  # a server that restarted: EVAL caches it again
                    return await self._pipeline(script.source, calls, then, by_sha=False)
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            raise BackplaneUnavailable(f"Redis presence: {exc}") from exc

    async def _pipeline(
        self, script: str, calls: list[tuple[Sequence[bytes], Sequence[bytes | int]]],
        then: Sequence[tuple[str, bytes]], *, by_sha: bool,
    ) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for keys, args in calls:
            if by_sha:
                pipe.evalsha(script, len(keys), *keys, *args)
            else:
                pipe.eval(script, len(keys), *keys, *args)
        for command, key in then:
            pipe.execute_command(command, key)
        replies: list[Any] = await pipe.execute()
        return replies

    async def _run(self, script: _Script, channel: str, *args: bytes | int) -> None:
        await self._pipelined(script, [(self.keys(channel), args)])
