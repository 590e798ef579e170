"""The Redis Cluster engine: sharded pub/sub, channel ``C`` is ``SSUBSCRIBE <prefix>C``.

Redis 7 routes a sharded channel to the master owning its hash slot, so the
backplane's traffic spreads over the shards instead of being broadcast to every
node of the cluster as classic PUBLISH is. Backends publish with
``SPUBLISH <prefix>C <payload>`` through any cluster client (it follows MOVED).

Why not redis-py's ``ClusterPubSub``: it is a polling API (``get_sharded_message``
round-robins over per-node connections with a timeout), ``ssubscribe`` returns
before Redis confirms, and its per-node connections reconnect and re-subscribe
behind the caller's back with redis-py's retry policy. We need the opposite on
every point (base.py): a confirmed subscribe, messages handed over straight from
the reader, our own backoff and our own view of what is up. So this engine
uses the subscriber link it shares with redis.py (link.py), once per shard:

* **Topology**: the slot → master map comes from ``CLUSTER SLOTS``, asked of a
  connected master first, then the URL's node, then the others. One keeper task
  refreshes it (with the shared backoff when no node answers) whenever something
  says it moved: a MOVED reply, a ``sunsubscribe`` pushed by Redis, a shard that
  cannot be reached.
* **One subscriber link per master**, opened eagerly for every master in the
  map (health is a property of the cluster, not of which channels happen to be
  subscribed; the number of links is bounded by the masters). Each link is a
  :class:`~wsbroker.backplane.link.SubscriberLink` speaking sharded pub/sub:
  RESP2, no read timeout, one reader task, a FIFO of the replies it expects, a
  PING watchdog, reconnect with backoff and re-subscribe of that shard's
  channels (timeouts and why: README.md, "Redis connection settings"), one
  SSUBSCRIBE per channel (one slot each, or Redis answers CROSSSLOT). Shards
  fail and recover independently.
* **Publishing**: ``SPUBLISH`` on a small blocking pool per master, routed by
  our slot map; a MOVED reply updates the map and
  is followed (at most twice).
* **Slot migration and failover**: when a slot's owner changes, the old owner
  drops our subscriptions itself and pushes ``sunsubscribe`` for each; we
  refresh the map (asking that node first: it knows) and SSUBSCRIBE those
  channels on the new owner. A map that still names the old owner is taken as
  gossip lag and asked again with backoff a few times before it is trusted.
  Masters that leave the map (demoted, removed) have their link closed.
  Messages published during the switch are not replayed (as after any
  reconnect).

``is_up``: True while the slot map is known and the subscriber link to every
master is connected. One shard down makes the engine report down (``/readyz``
503, as for a lost single Redis), but the engine stays partially useful:
``can_subscribe``, ``subscribe`` and ``publish`` fail (False,
:class:`BackplaneUnavailable`) only for channels whose slot lives on a shard
that is down; channels on the other shards keep working and keep delivering,
new subscriptions included. ``unsubscribe`` never fails.

History: the Function library ``wsbroker`` is loaded (or upgraded) on every
master when its link connects; a history publish is ``FCALL wsb_spublish`` on
the slot's owner, whose keys share the slot of the sharded channel. After a
shard's link reconnects, or channels move to another shard, the hub is told to
read what they missed (``on_resync``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, Connection, parse_url
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import MovedError, RedisError

from wsbroker.backplane.base import Backplane, BackplaneUnavailable
from wsbroker.backplane.functions import FunctionHistory
from wsbroker.backplane.link import (
    CONFIRM_TIMEOUT,
    CONNECT_TIMEOUT,
    PUBLISH_TIMEOUT,
    RESUBSCRIBE_CHUNK,
    SETUP_TIMEOUT,
    SHARDED,
    Claims,
    Hooks,
    Link,
    SubscriberLink,
    backoff_delay,
    client_options,
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

log = logging.getLogger("wsbroker.backplane.cluster")

MAX_REDIRECTS = 2
"""MOVED replies followed per subscribe or publish before giving up."""

REFRESH_SPACING = 0.05
"""Least seconds between two slot-map refreshes (a burst of MOVED asks once)."""

TRUST_MAP_AFTER = 4
"""Refreshes (with backoff) during which a map that still gives a dropped channel
to the shard that dropped it is taken as stale gossip, before we trust it."""



@dataclass(slots=True, eq=False)
class _Shard:
    """One master: its publishing pool, its subscriber link and the task that keeps it."""

    name: str
    host: str
    port: int
    pub: Redis
    sub: SubscriberLink = field(init=False)
    publisher: Pipeliner = field(init=False)
    """SPUBLISHes made in one loop turn, in one pipeline (see pipelining.py)."""
    up: bool = False
    down: bool = False
    """A connect attempt failed or the link was lost, and it is not back yet."""
    task: asyncio.Task[None] | None = None
    library: asyncio.Task[None] | None = None
    attempted: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def link(self) -> Link | None:
        """The subscriber connection, while connected."""
        return self.sub.link


class ClusterBackplane(FunctionHistory, Backplane):
    """SSUBSCRIBE on one link per master, SPUBLISH to the slot's owner."""

    publish_function = "wsb_spublish"

    ping_interval: float = 5.0
    """Seconds of silence on a subscriber link before we PING it."""

    ping_timeout: float = 3.0
    """Seconds a PING may go unanswered before that shard is declared lost."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        if not settings.redis_url:
            raise ValueError("the Redis Cluster backplane needs --redis-url")
        self._url = settings.redis_url
        self._prefix = settings.redis_prefix.encode()
        name = re.sub(r"[^A-Za-z0-9._:-]", "_", settings.node_id) or "node"
        sub_options, self._pub_options = client_options(name)
        url_options: dict[str, Any] = dict(parse_url(self._url))
        self._seed_host = str(url_options.pop("host", "127.0.0.1"))
        url_options.pop("port", None)
        url_options.pop("db", None)  # a cluster has database 0 only
        self._sub_class: type[AbstractConnection] = url_options.pop("connection_class",
                                                                     Connection)
        # Our options win over the URL's query string.
        self._sub_options: dict[str, Any] = {**url_options, **sub_options}
        self._seed_pub: Redis = publishing_client(self._url, self._pub_options)
        # Wanted channels: prefixed Redis name → our name (the readers' lookup
        # table), → the shard it is (to be) subscribed on, and which subscribe
        # call added it. Orphans were dropped by Redis (slot moved) or refused
        # with MOVED, and wait for the keeper to re-route them.
        self._names: dict[bytes, str] = {}
        self._owner: dict[bytes, _Shard] = {}
        self._orphans: dict[bytes, _Shard] = {}  # → the shard that dropped or refused it
        self._unresolved = 0  # keeper rounds in a row whose map still names that shard
        self._claims = Claims(self._forget)
        self._shards: dict[str, _Shard] = {}
        self._slots: list[str] | None = None  # slot → master name ("" = not covered)
        self._masters: set[str] = set()
        self._running = False
        self._up = False
        self._stale = asyncio.Event()
        self._mapped_once = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None

    # -- the Backplane interface -------------------------------------------

    @property
    def is_up(self) -> bool:
        return self._up

    def can_subscribe(self, channel: str) -> bool:
        """True while the map is known and the link to ``channel``'s master is up."""
        if not self._running or self._slots is None:
            return False
        try:
            return self._shard_for(self._prefix + channel.encode()).up
        except BackplaneUnavailable:
            return False

    @property
    def channels(self) -> frozenset[str]:
        """The channels this engine holds (and re-subscribes after a reconnect)."""
        return frozenset(self._names.values())

    @property
    def shards(self) -> dict[str, bool]:
        """Each master (``host:port``) and whether its subscriber link is up."""
        return {name: shard.up for name, shard in self._shards.items()}

    async def start(self) -> None:
        """Map the cluster and connect; returns after the first attempt even when down."""
        if self._keeper is not None:
            return
        self._running = True
        self._stale.set()
        self._keeper = asyncio.create_task(self._keep_topology(), name="wsb-cluster-topology")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SETUP_TIMEOUT + 1):
                await self._mapped_once.wait()
                for shard in list(self._shards.values()):
                    await shard.attempted.wait()

    async def stop(self) -> None:
        self._running = False
        self._up = False
        keeper, self._keeper = self._keeper, None
        tasks = [task for task in (keeper, *(s.task for s in self._shards.values()))
                 if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for shard in self._shards.values():
            await self._retire(shard)
        self._shards.clear()
        self._names.clear()
        self._claims.clear()
        self._owner.clear()
        self._orphans.clear()
        self._slots = None
        await self._seed_pub.aclose()

    async def subscribe(self, channel: str) -> None:
        self._require_map()
        key = self._prefix + channel.encode()
        loop = asyncio.get_running_loop()
        with self._claims.attempt(key) as claim:
            async with asyncio.timeout(CONFIRM_TIMEOUT):
                for redirects in itertools.count():
                    shard = self._shard_for(key)
                    link = shard.link
                    if not shard.up or link is None:
                        raise BackplaneUnavailable(f"Redis Cluster shard {shard.name} "
                                                   "is unavailable")
                    future: asyncio.Future[Exception | None] = loop.create_future()
                    async with link.lock:
                        if link.dead:
                            raise BackplaneUnavailable(f"Redis Cluster shard {shard.name} "
                                                       "is unavailable")
                        self._names[key] = channel
                        claim()
                        self._owner[key] = shard
                        self._orphans.pop(key, None)
                        await shard.sub.subscribe(link, key, future)
                    error = await future
                    if error is None:
                        return
                    if isinstance(error, MovedError) and redirects < MAX_REDIRECTS:
                        self._learn_moved(error, shard)
                        continue
                    raise BackplaneUnavailable(f"SSUBSCRIBE on Redis Cluster shard "
                                               f"{shard.name} failed: {error}")

    async def unsubscribe(self, channel: str) -> None:
        key = self._prefix + channel.encode()
        shard = self._owner.get(key)
        self._forget(key)
        if shard is not None:  # else not subscribed
            await shard.sub.drop(key, channel)

    async def publish(self, channel: str, payload: bytes) -> None:
        await self._on_owner(channel, "publish",
                             lambda shard, key: shard.publisher.send(key, payload))

    async def fcall(self, function: str, channel: str, *args: bytes | int) -> Any:
        return await self._on_owner(
            channel, "history call",
            lambda shard, key: call_function(shard.pub, function, key, *args))

    async def _on_owner(self, channel: str, what: str,
                        call: Callable[[_Shard, bytes], Awaitable[Any]]) -> Any:
        """``call`` on the master that owns ``channel``'s slot, following MOVED."""
        self._require_map()
        key = self._prefix + channel.encode()
        for redirects in itertools.count():
            shard = self._shard_for(key)
            if shard.down:
                raise BackplaneUnavailable(f"Redis Cluster shard {shard.name} is unavailable")
            try:
                return await call(shard, key)
            except MovedError as exc:
                if redirects >= MAX_REDIRECTS:
                    raise BackplaneUnavailable(f"Redis {what} redirected too often: {exc}"
                                               ) from exc
                self._learn_moved(exc, shard)
            except (RedisError, OSError) as exc:
                shard.sub.poke()  # check that shard's link now, not in 5 s
                raise BackplaneUnavailable(f"Redis {what} on {shard.name} failed: {exc}"
                                           ) from exc
        raise AssertionError("unreachable")

    async def _load_library(self, shard: _Shard) -> None:
        """Load the Function library on one master, for backends that FCALL it."""
        try:
            if await load_library(shard.pub):
                log.info("loaded the Redis Function library 'wsbroker' on shard %s", shard.name)
        except (RedisError, OSError) as exc:
            log.warning("cannot load the Redis Function library 'wsbroker' on shard %s (%s); "
                        "history needs Redis 7 or newer", shard.name, exc)

    # -- topology ----------------------------------------------------------

    def _require_map(self) -> None:
        if not self._running or self._slots is None:
            raise BackplaneUnavailable("the Redis Cluster is unavailable")

    def _shard_for(self, key: bytes) -> _Shard:
        """The master owning ``key``'s slot in our map (its link is kept by then)."""
        if self._slots is None:
            raise BackplaneUnavailable("the Redis Cluster is unavailable")
        name = self._slots[key_slot(key)]
        shard = self._shards.get(name) if name else None
        if shard is None:
            raise BackplaneUnavailable(f"no Redis Cluster master serves slot {key_slot(key)}")
        return shard

    def _shard(self, host: str, port: int) -> _Shard:
        """The shard at ``host:port``, created (with its link supervisor) if new."""
        name = f"{host}:{port}"
        shard = self._shards.get(name)
        if shard is None:
            netloc = urlsplit(self._url).netloc.rpartition("@")
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            url = urlsplit(self._url)._replace(netloc=netloc[0] + netloc[1] + address,
                                               path="").geturl()
            shard = _Shard(name, host, port, publishing_client(url, self._pub_options))
            shard.sub = self._subscriber(shard)
            shard.publisher = Pipeliner(shard.pub, "SPUBLISH")
            self._shards[name] = shard
            if self._running:
                shard.task = asyncio.create_task(self._supervise(shard),
                                                 name=f"wsb-cluster-{name}")
        return shard

    def _learn_moved(self, error: MovedError, via: _Shard) -> None:
        """Follow a MOVED reply now (one slot), and refresh the whole map soon."""
        if self._running and self._slots is not None:
            shard = self._shard(error.host or via.host, int(error.port))
            self._slots[int(error.slot_id)] = shard.name
        self._stale.set()

    async def _keep_topology(self) -> None:
        """Fetch the slot map whenever it is stale; re-route channels that moved."""
        attempt = 0
        failures = 0
        while True:
            await self._stale.wait()
            self._stale.clear()
            try:
                ranges = await self._fetch_slots()
            except BackplaneUnavailable as exc:
                level = logging.WARNING if failures % 10 == 0 else logging.DEBUG
                log.log(level, "cannot read the Redis Cluster slot map (seed %s): %s; "
                        "retrying with backoff", redact_url(self._url), exc)
                failures += 1
                self._mapped_once.set()
                self._stale.set()
                await asyncio.sleep(backoff_delay(attempt))
                attempt += 1
                continue
            first = self._slots is None
            try:
                self._install(ranges)
                if first or failures:
                    log.info("Redis Cluster at %s: %d masters", redact_url(self._url),
                             len(self._masters))
                failures = attempt = 0
                self._mapped_once.set()
                self._recompute_up()
                unresolved = await self._reroute()
                await self._retire_unused()
            except Exception:
                log.exception("re-routing channels after a slot-map change failed")
                unresolved = 0
            if unresolved:
                self._stale.set()
                await asyncio.sleep(backoff_delay(self._unresolved))
            else:
                await asyncio.sleep(REFRESH_SPACING)

    async def _fetch_slots(self) -> list[tuple[int, int, str, int]]:
        """``CLUSTER SLOTS`` from the first node that answers: connected masters first."""
        # Who just told us something moved knows best; then connected masters.
        witnesses = set(self._orphans.values())
        shards = sorted(self._shards.values(), key=lambda s: s not in witnesses)
        candidates = [(s.name, s.pub, s.host) for s in shards if s.up]
        candidates.append(("seed", self._seed_pub, self._seed_host))
        candidates += [(s.name, s.pub, s.host) for s in shards if not s.up]
        problems: list[str] = []
        for name, client, host in candidates:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT + PUBLISH_TIMEOUT):
                    reply = await client.execute_command(  # type: ignore[no-untyped-call]
                        "CLUSTER", "SLOTS")
                ranges = [(int(entry[0]), int(entry[1]),
                           (entry[2][0].decode() if isinstance(entry[2][0], bytes)
                            else str(entry[2][0])) or host,
                           int(entry[2][1]))
                          for entry in reply]
            except (RedisError, OSError, TimeoutError, ValueError, TypeError,
                    IndexError) as exc:
                problems.append(f"{name}: {str(exc) or type(exc).__name__}")
                continue
            if client is self._seed_pub:
                # Only a fallback once mapped: do not keep a spare connection open.
                await self._seed_pub.connection_pool.disconnect()
            if ranges:
                return ranges
            problems.append(f"{name}: no slots assigned")
        raise BackplaneUnavailable("; ".join(problems) or "no node to ask")

    def _install(self, ranges: list[tuple[int, int, str, int]]) -> None:
        """Adopt a slot map; open a link to every master in it (eagerly)."""
        slots = [""] * REDIS_CLUSTER_HASH_SLOTS
        masters: set[str] = set()
        for start, end, host, port in ranges:
            host = "127.0.0.1" if host == "?" else host
            shard = self._shard(host, port)
            masters.add(shard.name)
            slots[start:end + 1] = [shard.name] * (end + 1 - start)
        self._slots = slots
        self._masters = masters

    async def _reroute(self) -> int:
        """Subscribe each wanted channel on its slot's current owner, if it moved.

        Returns how many dropped channels the map still gives to the shard
        that dropped them: the map came from a node that has not heard of the
        change yet (gossip lag; a demoted master even accepts SSUBSCRIBE as a
        replica), so the keeper asks again, and trusts the map after a few rounds
        (the slot may really have come back).
        """
        moves: dict[_Shard, list[bytes]] = {}
        unresolved = 0
        for key, shard in list(self._owner.items()):
            try:
                owner = self._shard_for(key)
            except BackplaneUnavailable:
                continue  # slot not covered right now: keep it where it is
            dropped_by = self._orphans.get(key)
            if dropped_by is None and owner is shard:
                continue
            if owner is dropped_by and self._unresolved < TRUST_MAP_AFTER:
                unresolved += 1
                continue
            if owner is not shard:
                log.info("channel %s moved from shard %s to %s",
                         self._names.get(key, key), shard.name, owner.name)
                await self._drop_from(shard, key)
                if self._owner.get(key) is not shard:
                    continue  # unsubscribed (or subscribed afresh) while we waited
            self._owner[key] = owner
            self._orphans.pop(key, None)
            moves.setdefault(owner, []).append(key)
        self._unresolved = self._unresolved + 1 if unresolved else 0
        for shard, keys in moves.items():
            link = shard.link
            if link is None:
                continue  # its supervisor re-subscribes everything on connect
            for start in range(0, len(keys), RESUBSCRIBE_CHUNK):
                with contextlib.suppress(BackplaneUnavailable):
                    async with link.lock:
                        # Only what is still wanted here: a channel unsubscribed
                        # while we waited for the lock must not be resurrected.
                        chunk = [key for key in keys[start:start + RESUBSCRIBE_CHUNK]
                                 if self._owner.get(key) is shard]
                        if chunk and not link.dead:
                            await shard.sub.subscribe_many(link, chunk, None)
        self._recompute_up()
        return unresolved

    async def _drop_from(self, shard: _Shard, key: bytes) -> None:
        """Best effort SUNSUBSCRIBE of ``key`` on a shard that no longer owns it."""
        link = shard.link
        if link is None or self._orphans.get(key) is shard:
            return  # down (holds nothing), or Redis already dropped it
        with contextlib.suppress(BackplaneUnavailable):
            async with link.lock:
                if not link.dead:
                    await shard.sub.unsubscribe(link, key)

    async def _retire_unused(self) -> None:
        """Close shards that left the map and hold nothing (a master removed)."""
        held = set(self._owner.values())
        for name, shard in list(self._shards.items()):
            if name not in self._masters and shard not in held:
                del self._shards[name]
                log.info("Redis Cluster master %s left the slot map; link closed", name)
                if shard.task is not None:
                    shard.task.cancel()
                    await asyncio.gather(shard.task, return_exceptions=True)
                await self._retire(shard)
        self._recompute_up()

    async def _retire(self, shard: _Shard) -> None:
        if shard.library is not None:
            shard.library.cancel()
            await asyncio.gather(shard.library, return_exceptions=True)
        await shard.sub.stop()
        shard.up = False
        await shard.publisher.close()
        await shard.pub.aclose()

    def _forget(self, key: bytes) -> None:
        self._names.pop(key, None)
        self._claims.discard(key)
        self._owner.pop(key, None)
        self._orphans.pop(key, None)

    # -- state ---------------------------------------------------------------

    def _recompute_up(self) -> None:
        """Up: the map is known and every master's link is connected."""
        if not self._running:
            return
        up = (self._slots is not None and bool(self._masters)
              and all(self._shards[name].up for name in self._masters
                      if name in self._shards))
        if up != self._up:
            self._up = up
            try:
                self._on_state(up)
            except Exception:
                log.exception("the backplane state handler failed")

    # -- one shard's link: its life cycle and the cluster's rules for its replies

    def _subscriber(self, shard: _Shard) -> SubscriberLink:
        """A sharded-pub/sub link to ``shard``, holding the channels our map gives it."""
        owner = self._owner
        hooks = Hooks(
            deliver=lambda: self._on_message,
            wanted=functools.partial(self._held_by, shard),
            wants=lambda key: owner.get(key) is shard,
            lost=functools.partial(self._lost, shard),
            unasked_unsubscribe=functools.partial(self._dropped, shard),
            moved=functools.partial(self._moved, shard),
        )
        connect = functools.partial(self._sub_class, **{**self._sub_options,
                                                         "host": shard.host, "port": shard.port})
        return SubscriberLink(SHARDED, hooks, connect=connect, names=self._names, timing=self,
                              name=f"Redis Cluster shard {shard.name}", tag="wsb-cluster",
                              log=log)

    async def _supervise(self, shard: _Shard) -> None:
        """Connect, serve until the link is lost, back off, repeat."""
        await supervise(shard.sub, target=f"Redis Cluster shard {shard.name}", log=log,
                        failed=functools.partial(self._shard_failed, shard),
                        connected=functools.partial(self._shard_connected, shard))

    def _shard_failed(self, shard: _Shard) -> None:
        shard.down = True
        shard.attempted.set()
        self._stale.set()  # has its slots moved to another master (failover)?

    def _shard_connected(self, shard: _Shard, failures: int, again: bool) -> None:
        log.log(logging.WARNING if failures else logging.INFO,
                "%s Redis Cluster shard %s after %d failed attempts; %d channels here",
                "reconnected to" if again else "connected to", shard.name,
                failures, sum(1 for s in self._owner.values() if s is shard))
        shard.up = True
        shard.down = False
        self._recompute_up()
        shard.attempted.set()
        shard.library = asyncio.create_task(self._load_library(shard),
                                            name=f"wsb-cluster-library-{shard.name}")
        if again:
            self._resync([key for key, owner in self._owner.items() if owner is shard])

    def _resync(self, keys: list[bytes]) -> None:
        channels = [self._names[key] for key in keys if key in self._names]
        if channels:
            try:
                self._on_resync(channels)
            except Exception:
                log.exception("the backplane resync handler failed")

    def _held_by(self, shard: _Shard) -> list[bytes]:
        """The channels to SSUBSCRIBE on a fresh link to ``shard``."""
        # Not the channels this shard dropped: the keeper re-routes those.
        return [key for key, owner in self._owner.items()
                if owner is shard and self._orphans.get(key) is not shard]

    def _lost(self, shard: _Shard, reason: str, notify: bool) -> None:
        if shard.up:
            shard.up = False
            shard.down = True
            if notify:
                log.warning("lost Redis Cluster shard %s (%s); its %d channels will be "
                            "re-subscribed on reconnect; other shards are unaffected",
                            shard.name, reason,
                            sum(1 for s in self._owner.values() if s is shard))
                self._recompute_up()

    def _dropped(self, shard: _Shard, key: bytes) -> None:
        """Redis pushed an unasked ``sunsubscribe``: the slot left ``shard``; re-route."""
        if self._owner.get(key) is shard:
            log.info("Redis Cluster shard %s dropped channel %s (slot moved); "
                     "re-routing", shard.name, self._names.get(key, key))
            self._orphans[key] = shard
            self._stale.set()

    def _moved(self, shard: _Shard, key: bytes, error: MovedError) -> None:
        """Our own SSUBSCRIBE (re-subscribe, re-route) got MOVED: re-route ``key``."""
        if self._owner.get(key) is shard:
            self._orphans[key] = shard
            self._learn_moved(error, shard)

