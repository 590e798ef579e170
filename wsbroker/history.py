"""History: which channels keep it, where it lives, and how a gap is recovered (SPEC §7).

A history channel gives every message a per-channel ``offset`` (1, 2, 3…) in an
``epoch`` (an opaque string, new whenever the history was lost), so that a
client that comes back can say where it left off and get exactly what it
missed. Three parts live here:

* :class:`HistoryRules`: ``--history PATTERN=SIZE[:TTL]``, parsed once; the
  first pattern that matches a channel decides its SIZE and TTL.
* The Redis side: the Function library ``wsbroker`` (:data:`LIBRARY`), loaded
  or upgraded by every node at connect. A history publish is one ``FCALL``:
  append to the channel's stream, trim to SIZE, refresh the TTL and publish
  the ``wsb1`` envelope with ``offset`` and ``epoch``, atomically. Its keys
  ``{<prefix>C}:s`` (stream) and ``{<prefix>C}:m`` (offset and epoch) hash to
  the slot of the pub/sub name ``<prefix>C`` itself (channel names cannot
  contain braces), so the same call works on a Redis Cluster with SPUBLISH.
* :class:`MemoryHistory`: the same behaviour inside the node, for the
  in-process engine.

How a node uses offsets to deliver every message once, in order, and to
recover gaps is in :mod:`wsbroker.recovery`.
"""

from __future__ import annotations

import re
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import TYPE_CHECKING, Any

from wsbroker.channels import PatternSet
from wsbroker.protocol import Since, encode_envelope

if TYPE_CHECKING:  # the Redis client is imported only where Redis is used
    from redis.asyncio import Redis


class HistoryNotEnabled(Exception):
    """The channel matches no ``--history`` pattern."""


@dataclass(frozen=True, slots=True)
class Published:
    """Where a publish landed: ``offset`` and ``epoch`` on history channels, else None."""

    offset: int | None = None
    epoch: str | None = None


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """The answer to ``history``: message frames, oldest first, and the channel's position."""

    messages: list[bytes]
    offset: int
    epoch: str


@dataclass(frozen=True, slots=True)
class Position:
    """Where a subscription to a history channel starts: the ``subscribe`` ok's fields.

    ``offset`` is the newest message this subscriber has been given (the
    replay included, which follows the ok): live messages continue after it.
    ``recovered`` answers a ``since`` (None when there was none).
    """

    offset: int
    epoch: str
    recovered: bool | None = None

    def already_live(self, since: Since | None) -> Position:
        """The answer to a repeated ``subscribe``: nothing is replayed, so ``since``
        counts as recovered only if it is exactly here."""
        if since is None:
            return self
        return replace(self, recovered=since.epoch == self.epoch and since.offset == self.offset)

    def fields(self) -> dict[str, object]:
        """The fields the ``ok`` reply carries."""
        found: dict[str, object] = {"offset": self.offset, "epoch": self.epoch}
        if self.recovered is not None:
            found["recovered"] = self.recovered
        return found


@dataclass(frozen=True, slots=True)
class Stream:
    """What an engine read from a channel's history.

    ``offset``/``epoch``: the channel's latest position (0 before any publish);
    ``entries``: (offset, payload) pairs, oldest first, each payload the
    ``wsb1`` envelope exactly as it was published.
    """

    offset: int
    epoch: str
    entries: list[tuple[int, bytes]] = field(default_factory=list)


# -- rules -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HistoryRule:
    """Channels matching ``pattern`` keep their newest ``size`` messages, ``ttl`` s after
    the last publish (0: kept)."""

    pattern: str
    size: int
    ttl: int = 0


_RULE = re.compile(r"\s*([^=\s]+)\s*=\s*(\d+)\s*(?::\s*(\S+)\s*)?")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_SIZE = 1_000_000


def parse_rule(text: str) -> HistoryRule:
    """``chat.>=1000:24h`` → HistoryRule("chat.>", 1000, 86400); ValueError if malformed."""
    match = _RULE.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not PATTERN=SIZE[:TTL] (e.g. chat.>=1000:24h)")
    pattern, size_text, ttl_text = match.groups()
    PatternSet.parse([pattern])  # raises ValueError for an invalid pattern
    size = int(size_text)
    if not 1 <= size <= MAX_SIZE:
        raise ValueError(f"{text!r}: SIZE must be from 1 to {MAX_SIZE}")
    ttl = 0
    if ttl_text is not None:
        ttl_match = re.fullmatch(r"(\d+)([smhd]?)", ttl_text)
        if ttl_match is None or int(ttl_match.group(1)) == 0:
            raise ValueError(f"{text!r}: TTL must be a positive duration (e.g. 90s, 30m, 24h, 7d)")
        ttl = int(ttl_match.group(1)) * _DURATION_UNITS[ttl_match.group(2)]
    return HistoryRule(pattern, size, ttl)


@dataclass(frozen=True, slots=True)
class HistoryRules:
    """The ``--history`` rules in order; the first whose pattern matches a channel wins."""

    rules: tuple[HistoryRule, ...] = ()
    _sets: tuple[PatternSet, ...] = ()

    @classmethod
    def parse(cls, items: Iterable[str]) -> HistoryRules:
        rules = tuple(parse_rule(item) for item in items)
        return cls(rules, tuple(PatternSet.parse([rule.pattern]) for rule in rules))

    def __bool__(self) -> bool:
        return bool(self.rules)

    def rule_for(self, channel: str) -> HistoryRule | None:
        for rule, patterns in zip(self.rules, self._sets, strict=True):
            if patterns.matches(channel):
                return rule
        return None


# -- the Redis Function library --------------------------------------------------

LIBRARY_VERSION = 1
"""Raised with every change to :data:`LIBRARY`; a node only ever upgrades the library."""

LIBRARY = """#!lua name=wsbroker
-- wsbroker history (SPEC §7). For the pub/sub channel N = <prefix><channel>, the
-- keys are KEYS[1] = {N}:s (the stream) and KEYS[2] = {N}:m (offset and epoch):
-- the same hash slot as N itself, so SPUBLISH N works in a Redis Cluster.
local VERSION = __VERSION__

-- The pub/sub channel and the two keys, checked: they must be {N}:s and {N}:m.
local function keys_of(keys)
  local channel = keys[1] and string.match(keys[1], '^{([^{}]+)}:s$')
  if not channel or keys[2] ~= '{' .. channel .. '}:m' then
    error('wsbroker: the keys must be {<prefix><channel>}:s and {<prefix><channel>}:m')
  end
  return channel, keys[1], keys[2]
end

-- The channel's offset and epoch; a new epoch (and an empty stream) when none.
local function position(skey, mkey, ttl)
  local meta = redis.call('HMGET', mkey, 'o', 'e')
  if meta[2] then
    return tonumber(meta[1]) or 0, meta[2]
  end
  local t = redis.call('TIME')
  local epoch = string.format('%x%05x%04x', tonumber(t[1]), tonumber(t[2]),
                              math.random(0, 65535))
  redis.call('DEL', skey)
  redis.call('HSET', mkey, 'o', 0, 'e', epoch)
  if ttl > 0 then
    redis.call('EXPIRE', mkey, ttl)
  end
  return 0, epoch
end

local function number(value, name, least)
  local n = tonumber(value)
  if not n or n % 1 ~= 0 or n < least then
    error('wsbroker: ' .. name .. ' must be an integer >= ' .. least)
  end
  return n
end

-- ARGV: data (JSON), size, ttl seconds (0: none), [from]
local function publish(keys, args, command)
  local channel, skey, mkey = keys_of(keys)
  local data = args[1]
  local size = number(args[2], 'size', 1)
  local ttl = number(args[3], 'ttl', 0)
  local from = args[4]
  if data == nil or not pcall(cjson.decode, data) then
    error('wsbroker: data must be a JSON document')
  end
  local _, epoch = position(skey, mkey, 0)
  local offset = redis.call('HINCRBY', mkey, 'o', 1)
  local sender = ''
  if from and from ~= '' then
    sender = ',"from":' .. cjson.encode(from)
  end
  local payload = 'wsb1{"data":' .. data .. sender .. ',"offset":' .. offset ..
                  ',"epoch":"' .. epoch .. '"}'
  redis.call('XADD', skey, 'MAXLEN', size, offset .. '-0', 'p', payload)
  if ttl > 0 then
    redis.call('EXPIRE', skey, ttl)
    redis.call('EXPIRE', mkey, ttl)
  else
    redis.call('PERSIST', skey)
    redis.call('PERSIST', mkey)
  end
  redis.call(command, channel, payload)
  return {offset, epoch}
end

-- Entries as one string, "<offset> <length> <payload>" each: one bulk reply
-- is far cheaper for the client to read than a nested array per entry.
local function entries(reply, from, to, step)
  local out = {}
  for i = from, to, step do
    local entry = reply[i]
    local payload = entry[2][2]
    out[#out + 1] = string.match(entry[1], '^(%d+)') .. ' ' .. #payload .. ' ' .. payload
  end
  return table.concat(out)
end

-- ARGV: after offset, count, ttl → {offset, epoch, entries after that offset, oldest first}
local function since(keys, args)
  local after = number(args[1], 'after', 0)
  local count = number(args[2], 'count', 0)
  local _, skey, mkey = keys_of(keys)
  local offset, epoch = position(skey, mkey, number(args[3], 'ttl', 0))
  local found = ''
  if count > 0 and after < offset then
    local reply = redis.call('XRANGE', skey, (after + 1) .. '-0', '+', 'COUNT', count)
    found = entries(reply, 1, #reply, 1)
  end
  return {offset, epoch, found}
end

-- ARGV: count, ttl → {offset, epoch, the newest count entries, oldest first}
local function newest(keys, args)
  local count = number(args[1], 'count', 0)
  local _, skey, mkey = keys_of(keys)
  local offset, epoch = position(skey, mkey, number(args[2], 'ttl', 0))
  local found = ''
  if count > 0 and offset > 0 then
    local reply = redis.call('XREVRANGE', skey, '+', '-', 'COUNT', count)
    found = entries(reply, #reply, 1, -1)
  end
  return {offset, epoch, found}
end

redis.register_function('wsb_publish', function(k, a) return publish(k, a, 'PUBLISH') end)
redis.register_function('wsb_spublish', function(k, a) return publish(k, a, 'SPUBLISH') end)
redis.register_function('wsb_since', since)
redis.register_function('wsb_newest', newest)
redis.register_function{function_name='wsb_version', callback=function() return VERSION end,
                        flags={'no-writes'}}
""".replace("__VERSION__", str(LIBRARY_VERSION))

READ_PAGE = 1000
"""Entries fetched per read while recovering a gap."""


def parse_stream(reply: Any) -> Stream:
    """A ``wsb_since``/``wsb_newest`` reply → :class:`Stream`.

    Entries come as one string of ``<offset> <length> <payload>`` records.
    """
    offset, epoch, found = reply
    blob = bytes(found)
    entries: list[tuple[int, bytes]] = []
    position, end = 0, len(blob)
    while position < end:
        space = blob.index(b" ", position)
        second = blob.index(b" ", space + 1)
        start = second + 1
        stop = start + int(blob[space + 1:second])
        entries.append((int(blob[position:space]), blob[start:stop]))
        position = stop
    return Stream(int(offset), epoch.decode() if isinstance(epoch, bytes) else str(epoch),
                  entries)


def library_is_missing(error: Exception) -> bool:
    """True for the error Redis gives an FCALL of a function it does not know."""
    text = str(error).lower()
    return "function not found" in text or "no such function" in text


async def load_library(client: Redis) -> bool:
    """Load :data:`LIBRARY` on ``client``'s Redis unless it has this version or newer.

    Returns True if it loaded it. Only ever upgrades, so an old node in a
    rolling upgrade never takes the library back.
    """
    from redis.exceptions import ResponseError

    try:
        version = int(await client.fcall("wsb_version", 0))
    except ResponseError as exc:
        if not library_is_missing(exc):
            raise
        version = 0
    if version >= LIBRARY_VERSION:
        return False
    await client.function_load(LIBRARY, replace=True)
    return True


def history_keys(name: bytes) -> tuple[bytes, bytes]:
    """The stream and metadata keys of the pub/sub channel ``name`` (``<prefix><channel>``)."""
    return b"{" + name + b"}:s", b"{" + name + b"}:m"


async def call_function(client: Redis, function: str, name: bytes, *args: bytes | int) -> Any:
    """``FCALL function 2 {name}:s {name}:m args…``, loading the library if Redis lost it."""
    from redis.exceptions import ResponseError

    keys = history_keys(name)
    try:
        return await client.fcall(function, 2, *keys, *args)
    except ResponseError as exc:
        if not library_is_missing(exc):
            raise
    await load_library(client)
    return await client.fcall(function, 2, *keys, *args)



# -- the in-process history ------------------------------------------------------


@dataclass(slots=True)
class _Kept:
    epoch: str
    offset: int = 0
    entries: deque[tuple[int, bytes]] = field(default_factory=deque)
    expires: float | None = None


class MemoryHistory:
    """Streams kept in the node: the memory engine's history, same rules as Redis.

    A stream past its TTL is forgotten when next touched (or swept on
    publish), and comes back with a new epoch, as an expired Redis key does.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._kept: dict[str, _Kept] = {}
        self._publishes = 0

    def __len__(self) -> int:
        return len(self._kept)

    def _touch(self, channel: str, rule: HistoryRule, refresh: bool) -> _Kept:
        now = self._clock()
        kept = self._kept.get(channel)
        if kept is not None and kept.expires is not None and kept.expires <= now:
            kept = None
        if kept is None:
            kept = self._kept[channel] = _Kept(secrets.token_hex(8))
            refresh = True
        if refresh:
            kept.expires = now + rule.ttl if rule.ttl else None
        return kept

    def publish(self, channel: str, data: bytes, sender: str | None,
                rule: HistoryRule) -> tuple[bytes, Published]:
        """Record one message; returns the envelope to deliver and where it landed."""
        self._publishes += 1
        if self._publishes % 1024 == 0:
            self.sweep()
        kept = self._touch(channel, rule, refresh=True)
        kept.offset += 1
        payload = encode_envelope(data, sender, kept.offset, kept.epoch)
        kept.entries.append((kept.offset, payload))
        while len(kept.entries) > rule.size:
            kept.entries.popleft()
        return payload, Published(kept.offset, kept.epoch)

    def since(self, channel: str, after: int, count: int, rule: HistoryRule) -> Stream:
        kept = self._touch(channel, rule, refresh=False)
        found: list[tuple[int, bytes]] = []
        entries = kept.entries
        if count > 0 and after < kept.offset and entries:
            start = max(0, after + 1 - entries[0][0])
            stop = min(len(entries), start + count)
            # A deque is indexed in O(n): walk from the nearer end instead.
            if start < len(entries) - stop:
                found = list(islice(entries, start, stop))
            else:
                found = list(islice(reversed(entries), len(entries) - stop,
                                    len(entries) - start))[::-1]
        return Stream(kept.offset, kept.epoch, found)

    def newest(self, channel: str, count: int, rule: HistoryRule) -> Stream:
        kept = self._touch(channel, rule, refresh=False)
        found = list(islice(reversed(kept.entries), count))[::-1] if count > 0 else []
        return Stream(kept.offset, kept.epoch, found)

    def sweep(self) -> None:
        """Forget every stream past its TTL."""
        now = self._clock()
        for channel in [c for c, k in self._kept.items()
                        if k.expires is not None and k.expires <= now]:
            del self._kept[channel]

    def clear(self) -> None:
        self._kept.clear()
