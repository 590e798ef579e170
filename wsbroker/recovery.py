"""One history channel on one node: every offset delivered once, in order (SPEC §7).

The hub hands each message of a history channel to its :class:`ChannelHistory`,
which keeps the last offset delivered here and its epoch. The next offset is
fanned out at once, on the hot path's terms (one frame, one synchronous call
per subscriber); an offset already delivered is dropped. A gap, a message of
another epoch, or the backplane saying the subscription was restored
(``resync``) starts a catch-up: live messages are held while the stream is
read from the last offset delivered, the missed ones go out in order, then the
held ones. If the stream no longer has them (trimmed, lost, a new epoch), the
subscribers are told to resubscribe (``insufficient_state``) rather than
given a silent gap.

A subscriber joining with ``since`` is a *joiner* while its own replay is read:
what the channel delivers meanwhile waits in its ``held`` list, and the replay
plus that list are handed over, de-duplicated by offset, in the same
synchronous step that makes it a subscriber. So the replay has no gap, no
duplicate, and no live message can slip in between.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson

from wsbroker.backplane import Backplane, BackplaneUnavailable
from wsbroker.history import READ_PAGE, HistoryRule, Position, Stream
from wsbroker.metrics import Metrics
from wsbroker.protocol import ENVELOPE_MAGIC, Envelope, Since, encode_message

if TYPE_CHECKING:  # the hub imports this module; its types are only annotations here
    from wsbroker.hub import Outgoing, Subscriber

log = logging.getLogger("wsbroker.recovery")

INSUFFICIENT_STATE = "insufficient_state"
"""The ``unsubscribed`` reason when a channel's history was lost under its subscribers."""

MAX_HELD = 10_000
"""Live messages a channel holds while reading a gap before it gives up."""

AHEAD_WAIT = 3.0
"""Seconds a recovering subscriber that saw more than this node waits for it to catch up."""

RETRY_DELAY = 0.5
"""Seconds between attempts to read a gap while the backplane refuses."""

Confirm = Callable[[Position | None], None]
"""Told the subscription's position just before its first message (the ``ok``)."""


@dataclass(slots=True)
class _Joiner:
    """A subscriber reading its replay: what the channel delivers meanwhile waits here."""

    held: list[tuple[int, Outgoing]] = field(default_factory=list)
    reset: bool = False  # the channel's history was lost meanwhile


class ChannelHistory:
    """The sequence of one history channel on this node, and its recoveries."""

    def __init__(self, channel: str, rule: HistoryRule, *, backplane: Backplane,
                 metrics: Metrics, subscribers: dict[Subscriber, None],
                 frame: Callable[[bytes], Outgoing], lost: Callable[[], None],
                 replay_budget: int) -> None:
        self.channel = channel
        self.rule = rule
        self.epoch: str | None = None
        """None until the first read has given the channel's position."""
        self.offset = 0
        self._backplane = backplane
        self._metrics = metrics
        self._subscribers = subscribers  # the hub's own dict: it adds and removes
        self._frame = frame
        self._lost = lost
        self._replay_budget = replay_budget
        self._held: list[Envelope] | None = []  # a list from the start: the first read
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self._joiners: dict[Subscriber, _Joiner] = {}
        self._waiting: list[tuple[int, asyncio.Future[None]]] = []

    @property
    def position(self) -> Position | None:
        return None if self.epoch is None else Position(self.offset, self.epoch)

    @property
    def has_joiners(self) -> bool:
        return bool(self._joiners)

    def cancel(self) -> None:
        """Stop reading (the channel is dropped)."""
        if self._task is not None:
            self._task.cancel()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # -- live messages -----------------------------------------------------------

    def receive(self, envelope: Envelope) -> None:
        """Deliver the next offset; hold and read the stream on a gap; drop repeats."""
        held = self._held
        if held is not None:
            held.append(envelope)
            if len(held) > MAX_HELD:
                self._give_up()
            return
        offset = envelope.offset
        assert offset is not None
        if envelope.epoch == self.epoch and offset <= self.offset:
            self._metrics.messages_dropped.labels("duplicate").inc()
            return
        if envelope.epoch != self.epoch or offset != self.offset + 1:
            self._held = [envelope]  # a gap, or a new epoch: the stream says which
            self.resync()
            return
        self._fan_out(offset, encode_message(self.channel, envelope.data, envelope.sender,
                                             offset))

    def _fan_out(self, offset: int, payload: bytes) -> None:
        self.offset = offset
        message = self._frame(payload)
        delivered = 0
        for subscriber in self._subscribers:
            delivered += subscriber.deliver(message)
        self._metrics.messages_delivered.inc(delivered)
        if self._joiners:
            for joiner in self._joiners.values():
                joiner.held.append((offset, message))
        if self._waiting:
            still = []
            for until, future in self._waiting:
                if offset >= until:
                    if not future.done():
                        future.set_result(None)
                else:
                    still.append((until, future))
            self._waiting = still

    # -- catching up -----------------------------------------------------------------

    def resync(self) -> None:
        """Hold live messages and read the stream from the last offset delivered here."""
        if self._held is None:
            self._held = []
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._catch_up())
        else:
            self._again = True

    async def _catch_up(self) -> None:
        """The catch-up task: read, deliver, release what was held; again if asked."""
        attempt = 0
        while True:
            self._again = False
            first = self.epoch is None
            before = (self.epoch, self.offset)
            try:
                recovered = await self._read_gap()
            except BackplaneUnavailable as exc:
                attempt += 1
                if attempt == 1 or attempt % 20 == 0:
                    log.warning("cannot read the history of %s (%s); retrying", self.channel,
                                exc)
                if first and not self._subscribers and not self._joiners:
                    return  # the subscribe that wanted it fails; nobody else waits
                await asyncio.sleep(RETRY_DELAY)
                continue
            if not first:
                self._metrics.recoveries.labels(
                    "node_recovered" if recovered else "node_lost").inc()
            if self._again:
                continue
            held, self._held = self._held or [], None
            stuck = (self.epoch, self.offset) == before
            for envelope in held:
                if stuck and self._held is None and self._out_of_sequence(envelope):
                    # The stream has just been read and does not explain it (a raw
                    # PUBLISH of a made-up envelope): reading again would not either.
                    self._metrics.messages_dropped.labels("out_of_sequence").inc()
                    continue
                self.receive(envelope)
            if not self._again:
                return

    def _out_of_sequence(self, envelope: Envelope) -> bool:
        """Neither the next offset nor one already delivered."""
        offset = envelope.offset
        return envelope.epoch != self.epoch or (offset is not None and offset > self.offset + 1)

    async def _read_gap(self) -> bool:
        """Read and deliver everything after ``self.offset``; False if it was lost."""
        if self.epoch is None:  # the first read only learns the position
            stream = await self._backplane.read_since(self.channel, 0, 0, self.rule)
            self.epoch, self.offset = stream.epoch, stream.offset
            return True
        after = self.offset
        while True:
            stream = await self._backplane.read_since(self.channel, after, READ_PAGE, self.rule)
            if (stream.epoch != self.epoch or stream.offset < after
                    or (stream.offset > after and (not stream.entries
                                                   or stream.entries[0][0] != after + 1))):
                self._history_lost(stream)
                return False
            for offset, payload in stream.entries:
                frame = message_frame(self.channel, offset, payload)
                if frame is not None:
                    self._fan_out(offset, frame)
                else:
                    self.offset = offset
            after = self.offset
            if after >= stream.offset:
                return True

    def _history_lost(self, stream: Stream) -> None:
        """The stream no longer holds what this node's subscribers miss: tell them."""
        log.warning("history of %s lost (epoch %s offset %d here, epoch %s offset %d in the "
                    "stream); %d local subscribers told to resubscribe", self.channel,
                    self.epoch, self.offset, stream.epoch, stream.offset, len(self._subscribers))
        self.epoch, self.offset = stream.epoch, stream.offset
        self._drop_everyone()

    def _give_up(self) -> None:
        """Too much held while reading: forget the position; the next read starts afresh."""
        log.warning("history of %s: more than %d messages held while reading a gap; "
                    "local subscribers told to resubscribe", self.channel, MAX_HELD)
        self.epoch = None
        self._held = []
        self._drop_everyone()

    def _drop_everyone(self) -> None:
        for joiner in self._joiners.values():
            joiner.reset = True
            joiner.held.clear()
        self._lost()

    # -- a subscriber joining ------------------------------------------------------------

    async def join(self, subscriber: Subscriber, since: Since | None,
                   add: Callable[[], None], confirm: Confirm | None) -> Position:
        """Replay what ``subscriber`` missed since ``since``, then make it live (``add``)."""
        if self.epoch is None:
            if self._task is None or self._task.done():
                self.resync()  # the first read: the position
            assert self._task is not None
            await asyncio.shield(self._task)
            if self.epoch is None:
                raise BackplaneUnavailable("cannot read the channel's history")
        if subscriber in self._subscribers:
            position = Position(self.offset, self.epoch).already_live(since)
            if confirm is not None:
                confirm(position)
            return position
        joiner = self._joiners[subscriber] = _Joiner()
        try:
            entries, recovered = (await self._read_replay(since)
                                  if since is not None else ([], None))
        finally:
            del self._joiners[subscriber]
        # From here on, synchronous: nothing can be delivered in between.
        if self.epoch is None:  # the channel gave up its position meanwhile
            raise BackplaneUnavailable("the channel's history is being read again")
        if joiner.reset and recovered:
            entries, recovered = [], False
        replay: list[Outgoing] = []
        if recovered and since is not None:
            last = since.offset
            for offset, payload in entries:
                if last < offset <= self.offset:
                    frame = message_frame(self.channel, offset, payload)
                    if frame is not None:
                        replay.append(self._frame(frame))
                    last = offset
            for offset, message in joiner.held:
                if offset > last:
                    replay.append(message)
                    last = offset
        if recovered is not None:
            self._metrics.recoveries.labels("recovered" if recovered else "not_recovered").inc()
        position = Position(self.offset, self.epoch, recovered)
        add()
        if confirm is not None:
            confirm(position)
        for message in replay:
            subscriber.deliver(message)
        self._metrics.messages_delivered.inc(len(replay))
        return position

    async def _read_replay(self, since: Since) -> tuple[list[tuple[int, bytes]], bool]:
        """The stream entries after ``since`` up to where this node stands; False if lost."""
        epoch, until = self.epoch, self.offset
        if since.epoch != epoch:
            return [], False
        if since.offset >= until:
            if since.offset > until and not await self._wait_for(since):
                return [], False
            return [], True
        entries: list[tuple[int, bytes]] = []
        after, size = since.offset, 0
        while after < until:
            stream = await self._backplane.read_since(self.channel, after, READ_PAGE, self.rule)
            if stream.epoch != epoch:
                self.resync()  # lost here too: the node finds out and tells everyone
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

    async def _wait_for(self, since: Since) -> bool:
        """A client that saw offsets this node has not delivered yet: wait for them."""
        stream = await self._backplane.read_since(self.channel, since.offset, 0, self.rule)
        if stream.epoch != since.epoch or stream.offset < since.offset:
            return False  # beyond the latest
        if self.offset >= since.offset:
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((since.offset, future))
        try:
            async with asyncio.timeout(AHEAD_WAIT):
                await future
        except TimeoutError:
            return False
        return True


def message_frame(channel: str, offset: int, payload: bytes) -> bytes | None:
    """The message frame of a stored envelope; None if it is not one (never sent).

    Stored messages are read a thousand at a time (``history``, recovery), so
    the envelope is parsed once and the frame serialised once, ``data``
    included, rather than through ``decode_payload`` and a second dump.
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
