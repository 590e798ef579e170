"""The node's presence: which channels keep members, this node's own, and join/leave.

Sessions call :meth:`PresenceService.join` once a subscription is confirmed and
:meth:`~PresenceService.leave` when it ends; the HTTP API and the ``presence``
ops read through :meth:`~PresenceService.members` and
:meth:`~PresenceService.stats`. Which store holds the members (this process or
Redis) is the settings' choice, as for the backplane; nothing else knows.

Refresh, spread out: a Redis entry expires ``--presence-ttl`` after its last
refresh, and a live node refreshes each of its members every third of the TTL.
Members are dealt at random (by client id) into :data:`SLICES` slices and one
slice is refreshed per tick (TTL / 3 / SLICES: 1 s with the default 60 s) in
pipelined script calls (one per channel per 1,000 members, up to 10,000 members
per round trip), so 100,000 members cost 5,000 refreshes a second in one round
trip rather than one burst every 20 s.

Join and leave events are published on the channel's own backplane channel
(``wsb1{"event":…,"member":…}``), so every node delivers them in order with the
channel's messages; the hub skips the member's own connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Protocol

import orjson

from wsbroker.backplane import Backplane, BackplaneUnavailable
from wsbroker.config import Settings
from wsbroker.logs import Throttled
from wsbroker.metrics import Metrics
from wsbroker.presence.base import Member, PresenceNotEnabled, PresenceStats, PresenceStore
from wsbroker.protocol import encode_member_event
from wsbroker.tasks import cancel_and_wait

log = logging.getLogger("wsbroker.presence")

SLICES = 20
"""Refresh slices per period: each tick refreshes about 1/SLICES of the members."""

STOP_TIMEOUT = 2.0
"""Seconds a stopping node spends removing members left over; the rest expire."""


def create_presence_store(settings: Settings) -> PresenceStore:
    """The store the settings ask for: Redis (one or a cluster) when a URL is set."""
    if settings.redis_url:
        from wsbroker.presence.redis import RedisPresenceStore

        return RedisPresenceStore(settings)
    from wsbroker.presence.memory import MemoryPresenceStore

    return MemoryPresenceStore()


class MemberObserver(Protocol):
    """Told, synchronously, when this node gains or loses a member (webhooks)."""

    def member_joined(self, channel: str, user: str) -> None: ...

    def member_left(self, channel: str, user: str) -> None: ...


class PresenceService:
    """Presence and join/leave for one node, over a :class:`PresenceStore`."""

    def __init__(
        self,
        settings: Settings,
        backplane: Backplane,
        metrics: Metrics,
        store: PresenceStore | None = None,
        observer: MemberObserver | None = None,
    ) -> None:
        self._observer = observer
        self._settings = settings
        self._backplane = backplane
        self._metrics = metrics
        self._store = store if store is not None or not settings.presence else (
            create_presence_store(settings))
        # This node's members, dealt into slices: slice → channel → client → member.
        self._slices: list[dict[str, dict[str, Member]]] = [{} for _ in range(SLICES)]
        self._count = 0
        self._refresher: asyncio.Task[None] | None = None
        self._log_leave = Throttled(log, logging.WARNING)
        self._log_update = Throttled(log, logging.WARNING)
        self._log_refresh = Throttled(log, logging.WARNING)

    # -- what the node, the sessions and the HTTP API call ------------------------

    def enabled(self, channel: str) -> bool:
        """True when ``channel`` keeps a member list (``--presence``)."""
        return self._store is not None and self._settings.presence.matches(channel)

    async def members(self, channel: str) -> list[dict[str, Any]]:
        """Every member of ``channel`` on every node, each client once.

        Raises :class:`PresenceNotEnabled` or :class:`BackplaneUnavailable`.
        """
        return [orjson.loads(member) for member in await self.members_json(channel)]

    async def members_json(self, channel: str) -> list[bytes]:
        """:meth:`members`, each member as its JSON bytes (to splice into a reply)."""
        return await self._require(channel).members(channel)

    async def stats(self, channel: str) -> PresenceStats:
        """``clients`` and distinct ``users`` of ``channel``; raises like :meth:`members`."""
        return await self._require(channel).stats(channel)

    async def join(self, channel: str, member: Member) -> None:
        """Record ``member`` and announce it; call once its subscription is confirmed.

        Raises :class:`BackplaneUnavailable` with nothing left behind when it
        cannot (the subscribe then fails with ``unavailable``).
        """
        store = self._store if self.enabled(channel) else None
        if store is not None:
            await store.add(channel, member)
            self._hold(channel, member)
        if self._settings.join_leave.matches(channel):
            try:
                await self._backplane.publish(channel, encode_member_event("join", member.json))
            except BackplaneUnavailable:
                if store is not None and self._release(channel, member.client) is not None:
                    await store.remove(channel, member)
                raise

    async def leave(self, channel: str, member: Member) -> None:
        """Forget ``member`` and announce it. Never raises: what fails expires or is lost."""
        held = self._release(channel, member.client)
        if held is not None and self._store is not None:
            await self._store.remove(channel, held)
        if self._settings.join_leave.matches(channel):
            try:
                await self._backplane.publish(channel, encode_member_event("leave", member.json))
            except BackplaneUnavailable as exc:
                self._log_leave("could not announce {count} leave(s); latest on %r: %s",
                                  channel, exc)

    async def update(self, channel: str, member: Member) -> None:
        """A refreshed token: replace the member if what others see of it changed."""
        members = self._slice(member.client).get(channel)
        held = members.get(member.client) if members is not None else None
        if members is None or held is None or held.json == member.json or self._store is None:
            return
        members[member.client] = member
        try:
            await self._store.add(channel, member)
        except BackplaneUnavailable as exc:
            self._log_update("could not update {count} member(s); latest on %r: %s",
                              channel, exc)

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        if self._store is not None and self._refresher is None:
            await self._store.start()
            self._refresher = asyncio.create_task(self._keep_fresh(), name="wsb-presence")

    async def stop(self) -> None:
        """Stop refreshing and remove what this node still holds (best effort)."""
        refresher, self._refresher = self._refresher, None
        if refresher is not None:
            await cancel_and_wait(refresher)
        if self._store is None:
            return
        store = self._store
        left = [(channel, member) for held in self._slices for channel, members in held.items()
                for member in members.values()]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_TIMEOUT):
                for channel, member in left:
                    await store.remove(channel, member)
        for held in self._slices:
            held.clear()
        self._set_count(0)
        await store.stop()

    # -- this node's members ----------------------------------------------------

    def _require(self, channel: str) -> PresenceStore:
        if self._store is None or not self._settings.presence.matches(channel):
            raise PresenceNotEnabled(f"channel {channel!r} keeps no presence (see --presence)")
        if not self._backplane.is_up:
            raise BackplaneUnavailable("the backplane is down")
        return self._store

    def _slice(self, client: str) -> dict[str, dict[str, Member]]:
        return self._slices[hash(client) % SLICES]

    def _hold(self, channel: str, member: Member) -> None:
        members = self._slice(member.client).setdefault(channel, {})
        if member.client not in members:
            self._set_count(self._count + 1)
            if self._observer is not None:
                self._observer.member_joined(channel, member.user)
        members[member.client] = member

    def _release(self, channel: str, client: str) -> Member | None:
        held = self._slice(client)
        members = held.get(channel)
        member = members.pop(client, None) if members is not None else None
        if member is not None:
            self._set_count(self._count - 1)
            if self._observer is not None:
                self._observer.member_left(channel, member.user)
            if not members:
                del held[channel]
        return member

    def _set_count(self, count: int) -> None:
        self._count = count
        self._metrics.presence_members.set(count)

    # -- refresh ----------------------------------------------------------------

    async def _keep_fresh(self) -> None:
        loop = asyncio.get_running_loop()
        tick = self._settings.presence_ttl / 3 / SLICES
        due = loop.time()
        index = 0
        while True:
            due += tick
            await asyncio.sleep(max(0.0, due - loop.time()))
            due = max(due, loop.time() - tick)  # after a stall, do not race to catch up
            try:
                await self._refresh(self._slices[index])
            except Exception as exc:  # Redis down: the next tick tries again
                self._log_refresh("presence refresh failed {count} time(s); latest: %s", exc)
            index = (index + 1) % SLICES

    async def _refresh(self, held: dict[str, dict[str, Member]]) -> None:
        """Extend one slice's entries; add back those the store lost and we still hold."""
        store = self._store
        assert store is not None
        if not held:
            return
        snapshot = {channel: list(members.values()) for channel, members in held.items()}
        for channel, lost in await store.refresh(snapshot):
            current = held.get(channel, {}).get(lost.client)
            if current is not None:
                await store.add(channel, current)
