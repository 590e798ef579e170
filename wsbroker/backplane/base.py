"""The contract every backplane engine honours (memory, Redis, Redis Cluster).

The hub above it subscribes a channel once, whatever the number of local
subscribers, and relies on three promises:

* ``subscribe`` returns only once messages published afterwards will be
  delivered (the backplane has confirmed the subscription);
* ``on_message`` is called on the event loop thread, in publish order per
  channel, with the payload bytes exactly as published;
* while the engine is down, ``subscribe`` and ``publish`` raise
  :class:`BackplaneUnavailable`, ``unsubscribe`` never fails, and the engine
  re-subscribes every channel it holds once it is back;
* ``can_subscribe(channel)`` says whether a subscribe of that channel can
  succeed now. It is per channel: a Redis Cluster with one master down still
  serves the channels of the others.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

MessageHandler = Callable[[str, bytes], None]
"""Called with (channel, payload) for each message on a subscribed channel."""

StateHandler = Callable[[bool], None]
"""Called with True when the engine comes up, False when it goes down."""


class BackplaneUnavailable(Exception):
    """The backplane cannot take this request now; the client may retry."""


class Backplane(abc.ABC):
    """Moves payloads between nodes; knows channels and bytes, nothing of WebSockets."""

    def __init__(self) -> None:
        self._on_message: MessageHandler = _ignore_message
        self._on_state: StateHandler = _ignore_state

    def bind(self, on_message: MessageHandler, on_state: StateHandler) -> None:
        """Register the receivers; call before :meth:`start`."""
        self._on_message = on_message
        self._on_state = on_state

    @property
    @abc.abstractmethod
    def is_up(self) -> bool:
        """True while subscribes and publishes can succeed."""

    def can_subscribe(self, channel: str) -> bool:
        """True while ``channel`` can be subscribed (and, if held, is being received)."""
        return self.is_up

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


def _ignore_message(channel: str, payload: bytes) -> None:
    """Default receiver until :meth:`Backplane.bind` is called."""


def _ignore_state(up: bool) -> None:
    """Default state receiver until :meth:`Backplane.bind` is called."""
