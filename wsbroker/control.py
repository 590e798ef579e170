"""Node control over the backplane: orders every node of the fleet carries out.

The HTTP API's ``disconnect`` must reach connections on every node, so it is
published, like any message, on the backplane; but on a channel no client can
name: :data:`CONTROL_CHANNEL` holds a ``!``, which channel names forbid
(SPEC §3), so no client can subscribe to it, publish to it, or see it in
``/api/channels``. Every node listens on it from start to stop.

A control message is a JSON object ``{"op": "disconnect", "user": U}``.
Anything else on the channel is ignored (and logged, throttled): a node never
fails on a control message it does not understand, so a newer node may send
orders an older one skips.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import orjson

from wsbroker.backplane import Backplane, BackplaneUnavailable
from wsbroker.hub import Hub
from wsbroker.logs import Throttled

log = logging.getLogger("wsbroker.control")

CONTROL_CHANNEL = "!wsbroker.control"

DisconnectUser = Callable[[str], int]
"""Close every local connection of a user; returns how many were closed."""


def encode_disconnect(user: str) -> bytes:
    return orjson.dumps({"op": "disconnect", "user": user})


class Control:
    """Sends orders to every node, and carries out the ones this node receives."""

    def __init__(self, hub: Hub, backplane: Backplane, disconnect_user: DisconnectUser) -> None:
        self._hub = hub
        self._backplane = backplane
        self._disconnect_user = disconnect_user
        self._listening = False
        self._log_ignored = Throttled(log, logging.WARNING)

    @property
    def listening(self) -> bool:
        return self._listening

    async def listen(self) -> None:
        """Subscribe to the control channel; call again when the backplane comes up."""
        if self._listening:
            return
        try:
            await self._hub.listen(CONTROL_CHANNEL, self._on_message)
        except BackplaneUnavailable:
            log.debug("control channel not subscribed yet: the backplane is down")
            return
        self._listening = True

    async def disconnect(self, user: str) -> None:
        """Close every connection of ``user`` on every node with 4003.

        Raises :class:`~wsbroker.backplane.BackplaneUnavailable` when the order
        cannot be sent.
        """
        await self._backplane.publish(CONTROL_CHANNEL, encode_disconnect(user))

    def _on_message(self, channel: str, payload: bytes) -> None:
        try:
            order = orjson.loads(payload)
        except orjson.JSONDecodeError:
            order = None
        if (isinstance(order, dict) and order.get("op") == "disconnect"
                and isinstance(order.get("user"), str)):
            closed = self._disconnect_user(order["user"])
            if closed:
                log.info("disconnected %d connection(s) of a user on operator request", closed)
            return
        self._log_ignored("ignored {count} control message(s) this node does not understand "
                          "(latest %r)", payload[:100])
