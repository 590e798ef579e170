"""The node's webhook service: what happened on this node → fleet-wide events → requests.

The node tells it three things, all synchronously and without waiting: the
hub's first local subscriber of a channel arrived or its last one left
(:meth:`Webhooks.channel_held` / :meth:`Webhooks.channel_released`), a user's
first or last subscription to a presence channel on this node
(:meth:`Webhooks.member_joined` / :meth:`Webhooks.member_left`), and a client
published (:meth:`Webhooks.client_publish`). The tracker decides which of the
first two are fleet-wide transitions; the dispatcher batches and delivers.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from wsbroker.config import Settings
from wsbroker.metrics import Metrics
from wsbroker.webhooks.delivery import Dispatcher, time_ms
from wsbroker.webhooks.signing import decode_secret
from wsbroker.webhooks.tracking import Subject, Tracker, create_tracker

log = logging.getLogger("wsbroker.webhooks")

OCCUPANCY_EVENTS = ("channel_occupied", "channel_vacated")
MEMBER_EVENTS = ("member_added", "member_removed")


class Webhooks:
    """Signed event delivery for one node (SPEC §13). Start, then drain or close."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        if not settings.webhook_url:
            raise ValueError("webhooks need --webhook-url")
        self.events = frozenset(settings.webhook_events)
        self.tracks_occupancy = not self.events.isdisjoint(OCCUPANCY_EVENTS)
        self.tracks_members = not self.events.isdisjoint(MEMBER_EVENTS)
        self.dispatcher = Dispatcher(
            settings.webhook_url,
            [decode_secret(secret) for secret in settings.webhook_secret],
            metrics,
            limit=settings.webhook_queue,
            timeout=settings.webhook_timeout,
            retry_delays=settings.webhook_retry_delays,
        )
        self.tracker: Tracker = create_tracker(settings, self._started, self._ended)
        self._members: dict[Subject, int] = {}
        self._closed = False

    @property
    def settled(self) -> bool:
        """Nothing pending: every event this node owed has been delivered or dropped."""
        return self.tracker.settled and self.dispatcher.pending == 0

    async def start(self) -> None:
        await self.dispatcher.start()
        await self.tracker.start()

    async def drain(self, deadline: float) -> None:
        """Shutdown with time to spare: hand over holdings, then send what is pending
        until ``deadline`` (event-loop time)."""
        if self._closed:
            return
        await self.tracker.close()
        await self.dispatcher.drain(deadline)
        await self.close()

    async def close(self) -> None:
        """Stop now; what is still pending is dropped and counted."""
        if self._closed:
            return
        self._closed = True
        await self.tracker.close()
        await self.dispatcher.close()

    # -- what the node reports (synchronous, never raises) --------------------------

    def channel_held(self, channel: str) -> None:
        """This node's first local subscriber of ``channel`` arrived."""
        if self.tracks_occupancy:
            self.tracker.hold(Subject(channel))

    def channel_released(self, channel: str) -> None:
        """This node's last local subscriber of ``channel`` left."""
        if self.tracks_occupancy:
            self.tracker.release(Subject(channel))

    def member_joined(self, channel: str, user: str) -> None:
        """``user`` got a subscription to presence channel ``channel`` on this node."""
        if not self.tracks_members:
            return
        subject = Subject(channel, user)
        count = self._members.get(subject, 0)
        self._members[subject] = count + 1
        if count == 0:
            self.tracker.hold(subject)

    def member_left(self, channel: str, user: str) -> None:
        """One of ``user``'s subscriptions to presence channel ``channel`` ended here."""
        subject = Subject(channel, user)
        count = self._members.get(subject, 0)
        if count <= 1:
            if self._members.pop(subject, None) is not None:
                self.tracker.release(subject)
        else:
            self._members[subject] = count - 1

    def client_publish(self, channel: str, user: str, data: bytes) -> None:
        """A client published ``data`` (encoded JSON) to ``channel``."""
        if "client_publish" in self.events:
            self.dispatcher.emit({"type": "client_publish", "channel": channel,
                                  "time_ms": time_ms(), "user": user,
                                  "data": orjson.Fragment(data)}, len(data))

    # -- tracker transitions → events --------------------------------------------------

    def _started(self, subject: Subject, when: int) -> None:
        if subject.user is None:
            self._emit("channel_occupied", subject.channel, when)
        else:
            self._emit("member_added", subject.channel, when, user=subject.user)

    def _ended(self, subject: Subject, when: int) -> None:
        if subject.user is None:
            self._emit("channel_vacated", subject.channel, when)
        else:
            self._emit("member_removed", subject.channel, when, user=subject.user)

    def _emit(self, kind: str, channel: str, when: int, **extra: Any) -> None:
        if kind in self.events:
            self.dispatcher.emit({"type": kind, "channel": channel, "time_ms": when, **extra})
