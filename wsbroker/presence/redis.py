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

Scripts run with ``EVALSHA``, falling back to ``EVAL`` (which caches the script)
on the first call to a server that does not know it yet; with a cluster,
redis-py routes each call to the master of the keys' slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from wsbroker.backplane.base import BackplaneUnavailable
from wsbroker.backplane.link import client_options
from wsbroker.config import Settings
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
-- ARGV: ttl ms, client… ; returns the positions (1-based) of clients not held
local ttl = tonumber(ARGV[1])
local expiry = now_ms() + ttl
local missing = {}
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[2], ARGV[i]) then
    redis.call('ZADD', KEYS[2], expiry, ARGV[i])
  else
    missing[#missing + 1] = i - 1
  end
end
keep_alive(ttl)
return missing
"""

MEMBERS = _CLOCK + _EXPIRE + """
drop_expired(now_ms())
return redis.call('HVALS', KEYS[1])
"""

STATS = _CLOCK + _EXPIRE + """
drop_expired(now_ms())
return {redis.call('HLEN', KEYS[1]), redis.call('HLEN', KEYS[3])}
"""

REFRESH_CHUNK = 1000
"""Clients per refresh call: bounds how long one script holds Redis."""

MAX_IN_FLIGHT = 64
"""Script calls at once; the rest wait their turn. redis-py 8's pools refuse a
101st connection outright, so a burst of subscribes (a fleet reconnecting after
a drain) must queue here, not fail."""


class _Script:
    """A Lua script run by its SHA1, sent in full only to a server that lacks it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, client: Any, keys: Sequence[bytes], *args: bytes | int) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await client.eval(self.source, len(keys), *keys, *args)


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
        if settings.redis_cluster:
            self._client = RedisCluster.from_url(settings.redis_url, **options)
        else:
            self._client = Redis.from_url(settings.redis_url, **options)
        self._in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._add, self._remove = _Script(ADD), _Script(REMOVE)
        self._refresh, self._members, self._stats = _Script(REFRESH), _Script(MEMBERS), _Script(
            STATS)

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

    async def refresh(self, channel: str, members: Sequence[Member]) -> list[Member]:
        missing: list[Member] = []
        for start in range(0, len(members), REFRESH_CHUNK):
            chunk = members[start : start + REFRESH_CHUNK]
            positions = await self._run(self._refresh, channel, self._ttl_ms,
                                        *(member.client.encode() for member in chunk))
            missing.extend(chunk[int(position) - 1] for position in positions)
        return missing

    async def members(self, channel: str) -> list[bytes]:
        values: list[bytes] = await self._run(self._members, channel)
        return values

    async def stats(self, channel: str) -> PresenceStats:
        clients, users = await self._run(self._stats, channel)
        return PresenceStats(int(clients), int(users))

    async def _run(self, script: _Script, channel: str, *args: bytes | int) -> Any:
        try:
            async with self._in_flight:
                return await script(self._client, self.keys(channel), *args)
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            raise BackplaneUnavailable(f"Redis presence: {exc}") from exc
