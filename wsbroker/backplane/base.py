"""The contract every backplane engine honours (memory, Redis, Redis Cluster).

The hub above it subscribes a channel once, whatever the number of local
subscribers, and relies on three promises:

* ``subscribe`` returns only once messages published afterwards will be
  delivered (the backplane has confirmed the subscription);
* ``on_message`` is called on the event loop thread, in publish order per
  channel, with the payload bytes exactly as published;
* while the engine is down, ``subscribe`` and ``publish`` raise
  :class:`BackplaneUnavailable`, ``unsubscribe`` never fails, and the engine
  re-subscribes every channel it holds once it is back.

History (SPEC §7) is an engine capability too, with three more promises:

* ``publish_history`` records the message and publishes it in one atomic step:
  the payload subscribers get is the ``wsb1`` envelope carrying the same
  ``offset`` and ``epoch`` it returns, and offsets of one channel follow each
  other (1, 2, 3…) within an epoch;
* ``read_since``/``read_newest`` return the channel's position and retained
  payloads exactly as they were published, oldest first, creating the epoch
  if the channel had none;
* ``on_resync`` is called with the channels whose subscription was restored
  after a loss (messages published in between were not delivered), once
  messages flow again, so that the hub can read what it missed.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable

from wsbroker.history import HistoryRule, Published, Stream

MessageHandler = Callable[[str, bytes], None]
"""Called with (channel, payload) for each message on a subscribed channel."""

StateHandler = Callable[[bool], None]
"""Called with True when the engine comes up, False when it goes down."""

ResyncHandler = Callable[[Iterable[str]], None]
"""Called with channels re-subscribed after a loss: messages may be missing."""


class BackplaneUnavailable(Exception):
    """The backplane cannot take this request now; the client may retry."""


class Backplane(abc.ABC):
    """Moves payloads between nodes; knows channels and bytes, nothing of WebSockets."""

    def __init__(self) -> None:
        self._on_message: MessageHandler = _ignore_message
        self._on_state: StateHandler = _ignore_state
        self._on_resync: ResyncHandler = _ignore_resync

    def bind(self, on_message: MessageHandler, on_state: StateHandler,
             on_resync: ResyncHandler | None = None) -> None:
        """Register the receivers; call before :meth:`start`."""
        self._on_message = on_message
        self._on_state = on_state
        self._on_resync = on_resync or _ignore_resync

    @property
    @abc.abstractmethod
    def is_up(self) -> bool:
        """True while subscribes and publishes can succeed."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect. May return while still down; the engine then keeps retrying."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Disconnect and release everything."""

    @abc.abstractmethod
    async def subscribe(self, channel: str) -> None:
        """Start receiving ``channel``; returns once the subscription is confirmed."""

    @abc.abstractmethod
    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving ``channel``. Never raises for an engine that is down."""

    @abc.abstractmethod
    async def publish(self, channel: str, payload: bytes) -> None:
        """Hand ``payload`` to every node subscribed to ``channel``."""

    @abc.abstractmethod
    async def publish_history(self, channel: str, data: bytes, sender: str | None,
                              rule: HistoryRule) -> Published:
        """Record ``data`` (JSON bytes) in ``channel``'s history and publish it, atomically."""

    @abc.abstractmethod
    async def read_since(self, channel: str, after: int, count: int,
                         rule: HistoryRule) -> Stream:
        """At most ``count`` retained messages with an offset above ``after``."""

    @abc.abstractmethod
    async def read_newest(self, channel: str, count: int, rule: HistoryRule) -> Stream:
        """The newest ``count`` retained messages, oldest first."""


def _ignore_message(channel: str, payload: bytes) -> None:
    """Default receiver until :meth:`Backplane.bind` is called."""


def _ignore_state(up: bool) -> None:
    """Default state receiver until :meth:`Backplane.bind` is called."""


def _ignore_resync(channels: Iterable[str]) -> None:
    """Default resync receiver until :meth:`Backplane.bind` is called."""
