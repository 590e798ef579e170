"""Channel → local subscribers, and the fan-out of backplane messages to them.

The hub holds one backplane subscription per channel however many local
subscribers it has, and adds a subscriber only once that subscription is
confirmed, so the ``ok`` a client gets for ``subscribe`` means every later
publish reaches it.

Fan-out is the hot path: per backplane message the payload is validated once,
the outgoing WebSocket frame is built once, and each subscriber gets the same
bytes through a synchronous ``deliver`` call: no per-subscriber JSON, task or
await.

History channels (SPEC §7) add one rule per channel, not per subscriber: the
hub keeps the channel's last delivered offset, delivers offset N+1 next, drops
what it already delivered, and when it sees a gap (or the backplane says its
subscription was restored) it holds live messages, reads the missed ones from
the stream, delivers them in order, then the held ones. A subscriber that
joins with ``since`` is held the same way while its own replay is read. Every
publisher goes through :meth:`Hub.publish`, every reader through
:meth:`Hub.history`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import orjson

from wsbroker.backplane import Backplane, BackplaneUnavailable
from wsbroker.history import (
    READ_PAGE,
    HistoryNotEnabled,
    HistoryPage,
    HistoryRule,
    HistoryRules,
    Position,
    Published,
    Stream,
)
from wsbroker.logs import Throttled
from wsbroker.metrics import Metrics
from wsbroker.protocol import (
    ENVELOPE_MAGIC,
    Envelope,
    Since,
    decode_payload,
    encode_envelope,
    encode_message,
    text_frame,
)

log = logging.getLogger("wsbroker.hub")

INSUFFICIENT_STATE = "insufficient_state"
"""The ``unsubscribed`` reason when a channel's history was lost under its subscribers."""

MAX_HELD = 10_000
"""Live messages a history channel holds while reading a gap before it gives up."""

AHEAD_WAIT = 3.0
"""Seconds a recovering subscriber that saw more than this node waits for it to catch up."""

RETRY_DELAY = 0.5
"""Seconds between attempts to read a gap while the backplane refuses."""

Confirm = Callable[[Position | None], None]
"""Told the subscription's position just before its first message (the ``ok``)."""

@dataclass(frozen=True, slots=True)
class Outgoing:
    """One server frame: its JSON ``payload`` and the same as a framed ``wire`` message."""

    payload: bytes
    wire: bytes

    @classmethod
    def of(cls, payload: bytes) -> Outgoing:
        return cls(payload, text_frame(payload))


class Subscriber(Protocol):
    """What the hub needs from a session: take a frame now, without awaiting."""

    def deliver(self, message: Outgoing) -> bool:
        """Queue ``message``; False if this subscriber is closing and took nothing."""
        ...

    def unsubscribed(self, channel: str, reason: str) -> None:
        """The hub dropped this subscription (its history was lost); tell the client."""
        ...


@dataclass(slots=True)
class _Joiner:
    """A subscriber reading its replay: what the channel delivers meanwhile waits here."""

    held: list[tuple[int, Outgoing]] = field(default_factory=list)
    reset: bool = False  # the channel's history was lost meanwhile


@dataclass(slots=True)
class _History:
    """A history channel's sequence: the last offset delivered here, in which epoch."""

    rule: HistoryRule
    epoch: str | None = None
    offset: int = 0
    held: list[Envelope] | None = field(default_factory=list)
    """Live messages waiting while the stream is read (a list from the start: the
    first read gives the position)."""
    task: asyncio.Task[None] | None = None
    again: bool = False
    joiners: dict[Subscriber, _Joiner] = field(default_factory=dict)
    waiting: list[tuple[int, asyncio.Future[None]]] = field(default_factory=list)


@dataclass(slots=True)
class _Channel:
    """A channel's local subscribers and its backplane subscription."""

    ready: asyncio.Task[None]
    subscribers: dict[Subscriber, None] = field(default_factory=dict)
    joining: int = 0
    history: _History | None = None


class Hub:
    """Tracks who is subscribed to what on this node and fans messages out."""

    def __init__(self, backplane: Backplane, metrics: Metrics,
                 history: HistoryRules | None = None, replay_budget: int = 1024 * 1024) -> None:
        self._backplane = backplane
        self._metrics = metrics
        self._rules = history or HistoryRules()
        self._replay_budget = replay_budget
        self._channels: dict[str, _Channel] = {}
        self._subscription_count = 0
        self._log_invalid = Throttled(log, logging.WARNING)

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    @property
    def subscription_count(self) -> int:
        return self._subscription_count

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
        if not self._backplane.is_up:  # even for a channel held: it may be missing messages
            raise BackplaneUnavailable("the backplane is down")
        state = self._channels.get(channel)
        if state is None:
            task = asyncio.ensure_future(self._backplane.subscribe(channel))
            rule = self._rules.rule_for(channel)
            state = self._channels[channel] = _Channel(
                task, history=_History(rule) if rule is not None else None)
            self._metrics.channels.set(len(self._channels))
        state.joining += 1
        try:
            await asyncio.shield(state.ready)
            if state.history is not None:
                return await self._join_history(channel, state, state.history, subscriber,
                                                since, confirm)
        finally:
            state.joining -= 1
            # A failed backplane subscribe is forgotten so the next attempt retries.
            # (A waiter cancelled at shutdown leaves the channel to hub.close().)
            if state.ready.done() and (state.ready.cancelled() or state.ready.exception()):
                self._forget_if_idle(channel, state)
            elif state.history is not None and self._forget_if_idle(channel, state):
                self._release_backplane(channel)  # its history could not be read
        self._add(state, subscriber)
        if confirm is not None:
            confirm(None)
        return None

    def _add(self, state: _Channel, subscriber: Subscriber) -> None:
        if subscriber not in state.subscribers:
            state.subscribers[subscriber] = None
            self._subscription_count += 1
            self._metrics.subscriptions.set(self._subscription_count)

    def position(self, channel: str) -> Position | None:
        """A history channel's position on this node (None: no history, or not held here)."""
        state = self._channels.get(channel)
        history = state.history if state is not None else None
        if history is None or history.epoch is None:
            return None
        return Position(history.offset, history.epoch)

    async def unsubscribe(self, channel: str, subscriber: Subscriber) -> None:
        """Remove ``subscriber``; the last one out releases the backplane subscription."""
        state = self._channels.get(channel)
        if state is None or subscriber not in state.subscribers:
            return
        del state.subscribers[subscriber]
        self._subscription_count -= 1
        self._metrics.subscriptions.set(self._subscription_count)
        if self._forget_if_idle(channel, state):
            await self._backplane.unsubscribe(channel)

    def _forget_if_idle(self, channel: str, state: _Channel) -> bool:
        """Drop a channel that nobody holds or waits for; True if it was dropped."""
        if state.subscribers or state.joining or self._channels.get(channel) is not state:
            return False
        del self._channels[channel]
        self._metrics.channels.set(len(self._channels))
        if state.history is not None and state.history.task is not None:
            state.history.task.cancel()
        return True

    def _release_backplane(self, channel: str) -> None:
        """Unsubscribe a forgotten channel from the backplane, from a synchronous caller."""
        task = asyncio.ensure_future(self._backplane.unsubscribe(channel))
        task.add_done_callback(_ignore_result)

    def on_message(self, channel: str, payload: bytes) -> None:
        """Backplane receiver: validate once, frame once, deliver to every local subscriber."""
        metrics = self._metrics
        metrics.messages_received.inc()
        state = self._channels.get(channel)
        if state is None or (not state.subscribers and state.history is None):
            return
        started = time.perf_counter()
        try:
            envelope = decode_payload(payload)
        except ValueError as exc:
            self._drop_invalid(channel, exc)
            return
        history = state.history
        if history is not None and envelope.offset is not None and envelope.epoch is not None:
            self._sequence(channel, state, history, envelope)
            metrics.fanout_seconds.observe(time.perf_counter() - started)
            return
        message = Outgoing.of(
            encode_message(channel, envelope.data, envelope.sender, envelope.offset)
        )
        delivered = 0
        for subscriber in state.subscribers:
            delivered += subscriber.deliver(message)
        metrics.messages_delivered.inc(delivered)
        metrics.fanout_seconds.observe(time.perf_counter() - started)

    # -- history: publish, read, and the sequence of a channel ------------------------

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
            frame = _message_frame(channel, offset, payload)
            if frame is not None:
                messages.append(frame)
        return HistoryPage(messages, stream.offset, stream.epoch)

    def is_history_channel(self, channel: str) -> bool:
        return self._rules.rule_for(channel) is not None

    def resync(self, channels: Iterable[str]) -> None:
        """Backplane receiver: these subscriptions were restored; read what they missed."""
        for channel in channels:
            state = self._channels.get(channel)
            if state is not None and state.history is not None:
                self._catch_up(channel, state, state.history)

    def _sequence(self, channel: str, state: _Channel, history: _History,
                  envelope: Envelope) -> None:
        """Deliver the next offset; hold and read the stream on a gap; drop repeats."""
        held = history.held
        if held is not None:
            held.append(envelope)
            if len(held) > MAX_HELD:
                self._give_up(channel, state, history)
            return
        offset = envelope.offset
        assert offset is not None
        if envelope.epoch == history.epoch and offset <= history.offset:
            self._metrics.messages_dropped.labels("duplicate").inc()
            return
        if envelope.epoch != history.epoch or offset != history.offset + 1:
            history.held = [envelope]  # a gap, or a new epoch: the stream says which
            self._catch_up(channel, state, history)
            return
        self._fan_out_history(state, history, offset,
                              encode_message(channel, envelope.data, envelope.sender, offset))

    def _fan_out_history(self, state: _Channel, history: _History, offset: int,
                         payload: bytes) -> None:
        history.offset = offset
        message = Outgoing.of(payload)
        delivered = 0
        for subscriber in state.subscribers:
            delivered += subscriber.deliver(message)
        self._metrics.messages_delivered.inc(delivered)
        if history.joiners:
            for joiner in history.joiners.values():
                joiner.held.append((offset, message))
        if history.waiting:
            still = []
            for until, future in history.waiting:
                if offset >= until:
                    if not future.done():
                        future.set_result(None)
                else:
                    still.append((until, future))
            history.waiting = still

    def _catch_up(self, channel: str, state: _Channel, history: _History) -> None:
        """Hold live messages and read the stream from the last offset delivered here."""
        if history.held is None:
            history.held = []
        if history.task is None or history.task.done():
            history.task = asyncio.ensure_future(self._read_missed(channel, state, history))
        else:
            history.again = True

    async def _read_missed(self, channel: str, state: _Channel, history: _History) -> None:
        """The catch-up task: read, deliver, release what was held; again if asked."""
        attempt = 0
        while True:
            history.again = False
            first = history.epoch is None
            before = (history.epoch, history.offset)
            try:
                recovered = await self._read_gap(channel, state, history)
            except BackplaneUnavailable as exc:
                attempt += 1
                if attempt == 1 or attempt % 20 == 0:
                    log.warning("cannot read the history of %s (%s); retrying", channel, exc)
                if first and not state.subscribers and not history.joiners:
                    return  # the subscribe that wanted it fails; nobody else waits
                await asyncio.sleep(RETRY_DELAY)
                continue
            if not first:
                self._metrics.recoveries.labels(
                    "node_recovered" if recovered else "node_lost").inc()
            if history.again:
                continue
            held, history.held = history.held or [], None
            stuck = (history.epoch, history.offset) == before
            for envelope in held:
                if stuck and history.held is None and _out_of_sequence(history, envelope):
                    # The stream has just been read and does not explain it (a raw
                    # PUBLISH of a made-up envelope): reading again would not either.
                    self._metrics.messages_dropped.labels("out_of_sequence").inc()
                    continue
                self._sequence(channel, state, history, envelope)
            if not history.again:
                return

    async def _read_gap(self, channel: str, state: _Channel, history: _History) -> bool:
        """Read and deliver everything after ``history.offset``; False if it was lost."""
        if history.epoch is None:  # the first read only learns the position
            stream = await self._backplane.read_since(channel, 0, 0, history.rule)
            history.epoch, history.offset = stream.epoch, stream.offset
            return True
        after = history.offset
        while True:
            stream = await self._backplane.read_since(channel, after, READ_PAGE, history.rule)
            if (stream.epoch != history.epoch or stream.offset < after
                    or (stream.offset > after and (not stream.entries
                                                   or stream.entries[0][0] != after + 1))):
                self._history_lost(channel, state, history, stream)
                return False
            for offset, payload in stream.entries:
                frame = _message_frame(channel, offset, payload)
                if frame is not None:
                    self._fan_out_history(state, history, offset, frame)
                else:
                    history.offset = offset
            after = history.offset
            if after >= stream.offset:
                return True

    def _history_lost(self, channel: str, state: _Channel, history: _History,
                      stream: Stream) -> None:
        """The stream no longer holds what this node's subscribers miss: tell them."""
        log.warning("history of %s lost (epoch %s offset %d here, epoch %s offset %d in the "
                    "stream); %d local subscribers told to resubscribe", channel, history.epoch,
                    history.offset, stream.epoch, stream.offset, len(state.subscribers))
        history.epoch, history.offset = stream.epoch, stream.offset
        self._drop_subscribers(channel, state, history)

    def _give_up(self, channel: str, state: _Channel, history: _History) -> None:
        """Too much held while reading: forget the position; the next read starts afresh."""
        log.warning("history of %s: more than %d messages held while reading a gap; "
                    "local subscribers told to resubscribe", channel, MAX_HELD)
        history.epoch = None
        history.held = []
        self._drop_subscribers(channel, state, history)

    def _drop_subscribers(self, channel: str, state: _Channel, history: _History) -> None:
        for joiner in history.joiners.values():
            joiner.reset = True
            joiner.held.clear()
        subscribers = list(state.subscribers)
        state.subscribers.clear()
        self._subscription_count -= len(subscribers)
        self._metrics.subscriptions.set(self._subscription_count)
        for subscriber in subscribers:
            subscriber.unsubscribed(channel, INSUFFICIENT_STATE)
        if self._forget_if_idle(channel, state):
            self._release_backplane(channel)

    async def _join_history(self, channel: str, state: _Channel, history: _History,
                            subscriber: Subscriber, since: Since | None,
                            confirm: Confirm | None) -> Position:
        """Replay what ``subscriber`` missed since ``since``, then make it live."""
        if history.epoch is None:
            if history.task is None or history.task.done():
                self._catch_up(channel, state, history)  # the first read: the position
            assert history.task is not None
            await asyncio.shield(history.task)
            if history.epoch is None:
                raise BackplaneUnavailable("cannot read the channel's history")
        if subscriber in state.subscribers:
            position = Position(history.offset, history.epoch, None if since is None else (
                since.epoch == history.epoch and since.offset == history.offset))
            if confirm is not None:
                confirm(position)
            return position
        joiner = history.joiners[subscriber] = _Joiner()
        try:
            entries, recovered = (await self._read_replay(channel, history, since)
                                  if since is not None else ([], None))
        finally:
            del history.joiners[subscriber]
        # From here on, synchronous: nothing can be delivered in between.
        if history.epoch is None:  # the channel gave up its position meanwhile
            raise BackplaneUnavailable("the channel's history is being read again")
        if joiner.reset and recovered:
            entries, recovered = [], False
        replay: list[Outgoing] = []
        if recovered and since is not None:
            last = since.offset
            for offset, payload in entries:
                if last < offset <= history.offset:
                    frame = _message_frame(channel, offset, payload)
                    if frame is not None:
                        replay.append(Outgoing.of(frame))
                    last = offset
            for offset, message in joiner.held:
                if offset > last:
                    replay.append(message)
                    last = offset
        if recovered is not None:
            self._metrics.recoveries.labels("recovered" if recovered else "not_recovered").inc()
        position = Position(history.offset, history.epoch, recovered)
        self._add(state, subscriber)
        if confirm is not None:
            confirm(position)
        for message in replay:
            subscriber.deliver(message)
        self._metrics.messages_delivered.inc(len(replay))
        return position

    async def _read_replay(self, channel: str, history: _History,
                           since: Since) -> tuple[list[tuple[int, bytes]], bool]:
        """The stream entries after ``since`` up to where this node stands; False if lost."""
        epoch, until = history.epoch, history.offset
        if since.epoch != epoch:
            return [], False
        if since.offset >= until:
            if since.offset > until and not await self._wait_for(channel, history, since):
                return [], False
            return [], True
        entries: list[tuple[int, bytes]] = []
        after, size = since.offset, 0
        while after < until:
            stream = await self._backplane.read_since(channel, after, READ_PAGE, history.rule)
            if stream.epoch != epoch:
                self._catch_up(channel, self._channels[channel], history)  # lost here too
                return [], False
            if not stream.entries or stream.entries[0][0] != after + 1:
                return [], False  # trimmed
            for entry in stream.entries:
                size += len(entry[1])
            if size > self._replay_budget:
                return [], False  # more than the client could take at once: resync
            entries += stream.entries
            after = stream.entries[-1][0]
        return entries, True

    async def _wait_for(self, channel: str, history: _History, since: Since) -> bool:
        """A client that saw offsets this node has not delivered yet: wait for them."""
        stream = await self._backplane.read_since(channel, since.offset, 0, history.rule)
        if stream.epoch != since.epoch or stream.offset < since.offset:
            return False  # beyond the latest
        if history.offset >= since.offset:
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        history.waiting.append((since.offset, future))
        try:
            async with asyncio.timeout(AHEAD_WAIT):
                await future
        except TimeoutError:
            return False
        return True

    def _drop_invalid(self, channel: str, error: ValueError) -> None:
        self._metrics.messages_dropped.labels("invalid_payload").inc()
        self._log_invalid(
            "dropped {count} backplane payload(s) that are not JSON (latest on %r: %s); "
            "publishers must send a JSON document or a wsb1 envelope", channel, error,
        )

    async def close(self) -> None:
        """Cancel backplane subscriptions and history reads still in flight (node shutdown)."""
        for state in list(self._channels.values()):
            state.ready.cancel()
            with contextlib.suppress(BaseException):
                await state.ready
            task = state.history.task if state.history is not None else None
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self._channels.clear()
        self._subscription_count = 0


def _message_frame(channel: str, offset: int, payload: bytes) -> bytes | None:
    """The message frame of a stored envelope; None if it is not one (never sent).

    Stored messages are read a thousand at a time (``history``, recovery), so
    the envelope is parsed once and the frame serialised once, ``data``
    included, rather than through :func:`decode_payload` and a second dump.
    """
    if not payload.startswith(ENVELOPE_MAGIC):
        return None
    try:
        body = orjson.loads(memoryview(payload)[len(ENVELOPE_MAGIC):])
    except orjson.JSONDecodeError:
        return None
    if not isinstance(body, dict) or "data" not in body:
        return None
    frame = {"type": "message", "channel": channel, "data": body["data"]}
    sender = body.get("from")
    if isinstance(sender, str):
        frame["from"] = sender
    frame["offset"] = offset
    return orjson.dumps(frame)


def _out_of_sequence(history: _History, envelope: Envelope) -> bool:
    """An envelope that is neither the next offset nor one already delivered."""
    offset = envelope.offset
    return envelope.epoch != history.epoch or (offset is not None
                                                and offset > history.offset + 1)


def _ignore_result(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: an unsubscribe of a dropped channel never matters
