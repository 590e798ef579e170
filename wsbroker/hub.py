"""Channel → local subscribers, and the fan-out of backplane messages to them.

The hub holds one backplane subscription per channel however many local
subscribers it has, and adds a subscriber only once that subscription is
confirmed, so the ``ok`` a client gets for ``subscribe`` means every later
publish reaches it.

Fan-out is the hot path: per backplane message the payload is validated once,
the outgoing WebSocket frame is built once, and each subscriber gets the same
bytes through a synchronous ``deliver`` call: no per-subscriber JSON, task or
await.

History channels (SPEC §7) add one rule per channel, not per subscriber: each
has a :class:`~wsbroker.recovery.ChannelHistory` that delivers its offsets in
order, once, and reads the stream to fill gaps and replays. Every publisher
goes through :meth:`Hub.publish`, every reader through :meth:`Hub.history`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from orjson import loads

from wsbroker.backplane import Backplane, BackplaneUnavailable, MessageHandler
from wsbroker.history import HistoryNotEnabled, HistoryPage, HistoryRules, Position, Published
from wsbroker.logs import Throttled
from wsbroker.metrics import Metrics
from wsbroker.protocol import (
    ENVELOPE_MAGIC,
    MemberEvent,
    Since,
    decode_payload,
    encode_envelope,
    encode_member_frame,
    encode_message,
    message_prefix,
    text_frame,
    text_frame_header,
)
from wsbroker.recovery import INSUFFICIENT_STATE, ChannelHistory, Confirm, message_frame

log = logging.getLogger("wsbroker.hub")

_new_tuple = tuple.__new__


class Outgoing(NamedTuple):
    """One server frame as it goes on the ``wire``; its JSON ``payload`` starts at
    ``start`` (sliced only when wanted: by a compressed connection).

    Immutable (it is shared by every subscriber of a message) and a tuple
    rather than a frozen dataclass: one is built per message on the fan-out
    path, and a frozen dataclass costs about four times as much to build.
    """

    wire: bytes
    start: int

    @property
    def payload(self) -> bytes:
        return self.wire[self.start:]

    @classmethod
    def of(cls, payload: bytes) -> Outgoing:
        wire = text_frame(payload)
        return cls(wire, len(wire) - len(payload))

    @classmethod
    def message(cls, prefix: bytes, data: bytes) -> Outgoing:
        """A plain message frame: a channel's :func:`message_prefix`, then ``data``.

        Built with ``tuple.__new__``: the named tuple's own ``__new__`` is a
        Python function, and this runs once per message on the fan-out path."""
        header = text_frame_header(len(prefix) + len(data) + 1)
        return _new_tuple(cls, (b"".join((header, prefix, data, b"}")), len(header)))


class Subscriber(Protocol):
    """What the hub needs from a session: take a frame now, without awaiting."""

    client_id: str
    """The connection's id: a member never receives its own join or leave."""

    def deliver(self, message: Outgoing) -> bool:
        """Queue ``message``; False if this subscriber is closing and took nothing."""
        ...

    def unsubscribed(self, channel: str, reason: str) -> None:
        """The hub dropped this subscription (its history was lost); tell the client."""
        ...


class ChannelObserver(Protocol):
    """Told when this node starts and stops holding a channel (webhook occupancy).

    Both are called synchronously on the subscribe/unsubscribe path, paired,
    and must neither block nor raise.
    """

    def channel_held(self, channel: str) -> None:
        """The first local subscriber of ``channel`` arrived."""
        ...

    def channel_released(self, channel: str) -> None:
        """The last local subscriber of ``channel`` left."""
        ...


@dataclass(slots=True)
class _Channel:
    """A channel's local subscribers and its backplane subscription."""

    ready: asyncio.Task[None] | None
    """The backplane subscribe while it is under way (or failed); None once confirmed,
    so a quiet channel does not keep a finished task for its whole life."""
    prefix: bytes
    """The start of this channel's message frames (:func:`message_prefix`)."""
    subscribers: dict[Subscriber, None] = field(default_factory=dict)
    joining: int = 0
    history: ChannelHistory | None = None

    def confirmed(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is None:
            self.ready = None


class Hub:
    """Tracks who is subscribed to what on this node and fans messages out."""

    def __init__(self, backplane: Backplane, metrics: Metrics,
                 history: HistoryRules | None = None, replay_budget: int = 1024 * 1024,
                 observer: ChannelObserver | None = None) -> None:
        self._backplane = backplane
        self._metrics = metrics
        self._rules = history or HistoryRules()
        self._replay_budget = replay_budget
        self._observer = observer
        self._channels: dict[str, _Channel] = {}
        self._subscription_count = 0
        self._closed = False
        self._listeners: dict[str, MessageHandler] = {}
        self._log_invalid = Throttled(log, logging.WARNING)

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    @property
    def subscription_count(self) -> int:
        return self._subscription_count

    def channel_names(self) -> list[str]:
        """The channels with at least one local subscriber."""
        return [name for name, state in self._channels.items() if state.subscribers]

    async def listen(self, channel: str, handler: MessageHandler) -> None:
        """Receive the raw payloads of an internal backplane channel (node control).

        ``channel`` must be a name no client channel can take; its payloads
        never reach sessions. Raises ``BackplaneUnavailable`` like ``subscribe``.
        """
        self._listeners[channel] = handler
        await self._backplane.subscribe(channel)

    async def subscribe(self, channel: str, subscriber: Subscriber, since: Since | None = None,
                        confirm: Confirm | None = None) -> Position | None:
        """Add ``subscriber`` once the backplane has confirmed ``channel``.

        On a history channel, a ``since`` replays what the subscriber missed:
        ``confirm`` gets the position (the ``ok``) right before the replay and
        the live messages that follow, with nothing in between. On other
        channels ``confirm`` gets None and ``since`` is ignored.

        Raises :class:`~wsbroker.backplane.BackplaneUnavailable` when the
        backplane cannot subscribe now; nothing is left half-done then.
        """
        if self._closed:
            raise BackplaneUnavailable("the node is shutting down")
        # Even for a channel held here: it may be missing messages.
        if not self._backplane.can_subscribe(channel):
            raise BackplaneUnavailable("the backplane is down for this channel")
        state = self._channels.get(channel)
        if state is None:
            task = asyncio.ensure_future(self._backplane.subscribe(channel))
            state = self._channels[channel] = _Channel(task, message_prefix(channel))
            task.add_done_callback(state.confirmed)
            rule = self._rules.rule_for(channel)
            if rule is not None:
                state.history = ChannelHistory(
                    channel, rule, backplane=self._backplane, metrics=self._metrics,
                    subscribers=state.subscribers, frame=Outgoing.of,
                    lost=lambda: self._drop_subscribers(channel, state),
                    replay_budget=self._replay_budget)
            self._metrics.channels.set(len(self._channels))
        state.joining += 1
        ready = state.ready
        try:
            if ready is not None:
                await asyncio.shield(ready)
            if state.history is not None:
                return await state.history.join(
                    subscriber, since, lambda: self._add(channel, state, subscriber), confirm)
        except asyncio.CancelledError:
            caller = asyncio.current_task()
            if ((self._closed or (ready is not None and ready.cancelled()))
                    and caller is not None and not caller.cancelling()):
                # Cancelled by close(), not the caller: the node is shutting down.
                raise BackplaneUnavailable("the node is shutting down") from None
            raise
        finally:
            state.joining -= 1
            # A failed backplane subscribe is forgotten so the next attempt retries.
            # (A waiter cancelled at shutdown leaves the channel to hub.close().)
            if ready is not None and ready.done() and (ready.cancelled() or ready.exception()):
                self._forget_if_idle(channel, state)
            elif state.history is not None and self._forget_if_idle(channel, state):
                self._release_backplane(channel)  # its history could not be read
        if self._closed:  # close() ran meanwhile
            raise BackplaneUnavailable("the node is shutting down")
        self._add(channel, state, subscriber)
        if confirm is not None:
            confirm(None)
        return None

    def _add(self, channel: str, state: _Channel, subscriber: Subscriber) -> None:
        if subscriber not in state.subscribers:
            if not state.subscribers and self._observer is not None:
                self._observer.channel_held(channel)
            state.subscribers[subscriber] = None
            self._subscription_count += 1
            self._metrics.subscriptions.set(self._subscription_count)

    def position(self, channel: str) -> Position | None:
        """A history channel's position on this node (None: no history, or not held here)."""
        state = self._channels.get(channel)
        return state.history.position if state is not None and state.history else None

    async def unsubscribe(self, channel: str, subscriber: Subscriber) -> None:
        """Remove ``subscriber``; the last one out releases the backplane subscription."""
        state = self._channels.get(channel)
        if state is None or subscriber not in state.subscribers:
            return
        del state.subscribers[subscriber]
        self._subscription_count -= 1
        self._metrics.subscriptions.set(self._subscription_count)
        if not state.subscribers and self._observer is not None:
            self._observer.channel_released(channel)
        if self._forget_if_idle(channel, state):
            await self._backplane.unsubscribe(channel)

    def _forget_if_idle(self, channel: str, state: _Channel) -> bool:
        """Drop a channel that nobody holds or waits for; True if it was dropped."""
        if state.subscribers or state.joining or self._channels.get(channel) is not state:
            return False
        del self._channels[channel]
        self._metrics.channels.set(len(self._channels))
        if state.history is not None:
            state.history.cancel()
        return True

    def _release_backplane(self, channel: str) -> None:
        """Unsubscribe a forgotten channel from the backplane, from a synchronous caller."""
        task = asyncio.ensure_future(self._backplane.unsubscribe(channel))
        task.add_done_callback(_ignore_result)

    def on_message(self, channel: str, payload: bytes) -> None:
        """Backplane receiver: validate once, frame once, deliver to every local subscriber."""
        tally = self._metrics.tally
        timed = tally.received()
        state = self._channels.get(channel)
        if state is None or (not state.subscribers and state.history is None):
            listener = self._listeners.get(channel) if state is None else None
            if listener is not None:
                listener(channel, payload)
            return
        started = time.perf_counter() if timed else 0.0
        if not payload.startswith(ENVELOPE_MAGIC):  # a backend's raw JSON: the common case
            try:
                loads(payload)  # validation only: the bytes go out as published
            except ValueError as exc:
                self._drop_invalid(channel, exc)
                return
            self._fan_out(state, Outgoing.message(state.prefix, payload))
        else:
            try:
                envelope = decode_payload(payload)
            except ValueError as exc:
                self._drop_invalid(channel, exc)
                return
            if envelope.event is not None:
                self._announce(channel, state, envelope.event)
            elif (history := state.history) is not None and envelope.epoch is not None and (
                    envelope.offset is not None):
                history.receive(envelope)
            else:
                self._fan_out(state, Outgoing.of(
                    encode_message(channel, envelope.data, envelope.sender, envelope.offset)))
        if timed:
            self._metrics.fanout_seconds.observe(time.perf_counter() - started)

    def _fan_out(self, state: _Channel, message: Outgoing) -> None:
        delivered = 0
        for subscriber in state.subscribers:
            delivered += subscriber.deliver(message)
        self._metrics.tally.delivered(delivered)

    def _announce(self, channel: str, state: _Channel, event: MemberEvent) -> None:
        """Fan a join/leave out, framed once, to every local subscriber but the member."""
        message = Outgoing.of(encode_member_frame(event.kind, channel, event.member))
        delivered = 0
        for subscriber in state.subscribers:
            if subscriber.client_id != event.client:
                delivered += subscriber.deliver(message)
        self._metrics.tally.delivered(delivered)

    # -- publishing and history ------------------------------------------------------

    async def publish(self, channel: str, data: bytes, sender: str | None = None) -> Published:
        """Publish ``data`` (encoded JSON) to ``channel``: the one way in for every publisher.

        On a history channel it is recorded and gets an offset; raises
        :class:`~wsbroker.backplane.BackplaneUnavailable` when the backplane is down.
        """
        rule = self._rules.rule_for(channel)
        if rule is not None:
            return await self._backplane.publish_history(channel, data, sender, rule)
        # Without a sender the raw form is enough: the document reaches clients as is.
        payload = data if sender is None else encode_envelope(data, sender)
        await self._backplane.publish(channel, payload)
        return Published()

    async def history(self, channel: str, limit: int) -> HistoryPage:
        """The newest ``limit`` messages of ``channel`` as message frames, oldest first.

        Raises :class:`~wsbroker.history.HistoryNotEnabled` on a channel without
        history, :class:`~wsbroker.backplane.BackplaneUnavailable` when down.
        """
        rule = self._rules.rule_for(channel)
        if rule is None:
            raise HistoryNotEnabled(f"channel {channel!r} keeps no history (see --history)")
        stream = await self._backplane.read_newest(channel, limit, rule)
        messages = []
        for offset, payload in stream.entries:
            frame = message_frame(channel, offset, payload)
            if frame is not None:
                messages.append(frame)
        return HistoryPage(messages, stream.offset, stream.epoch)

    def resync(self, channels: Iterable[str]) -> None:
        """Backplane receiver: these subscriptions were restored; read what they missed."""
        for channel in channels:
            state = self._channels.get(channel)
            if state is not None and state.history is not None:
                state.history.resync()

    def _drop_subscribers(self, channel: str, state: _Channel) -> None:
        """The channel's history was lost under its subscribers: tell them, drop them."""
        subscribers = list(state.subscribers)
        state.subscribers.clear()
        self._subscription_count -= len(subscribers)
        self._metrics.subscriptions.set(self._subscription_count)
        for subscriber in subscribers:
            subscriber.unsubscribed(channel, INSUFFICIENT_STATE)
        if subscribers and self._observer is not None:
            self._observer.channel_released(channel)
        if self._forget_if_idle(channel, state):
            self._release_backplane(channel)

    def _drop_invalid(self, channel: str, error: ValueError) -> None:
        self._metrics.messages_dropped.labels("invalid_payload").inc()
        self._log_invalid(
            "dropped {count} backplane payload(s) that are not JSON (latest on %r: %s); "
            "publishers must send a JSON document or a wsb1 envelope", channel, error,
        )

    async def close(self) -> None:
        """Node shutdown: cancel backplane subscriptions and history reads still in
        flight, zero the gauges.

        A caller cancelled while waiting here is cancelled (nothing swallows it).
        """
        self._closed = True
        states = list(self._channels.values())
        pending = [state.ready for state in states
                   if state.ready is not None and not state.ready.done()]
        self._channels.clear()
        self._listeners.clear()
        self._subscription_count = 0
        self._metrics.channels.set(0)
        self._metrics.subscriptions.set(0)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        for state in states:
            if state.history is not None:
                await state.history.close()


def _ignore_result(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: an unsubscribe of a dropped channel never matters
