"""One connected client: who it is, what it subscribed to, and its ops, one at a time.

Ops from one connection are handled in order, so a client's publishes reach
the backplane in the order it sent them and its replies come back in order.
They wait in the session's inbox; a task works through it only while there is
something to do, so an idle client costs no task (its connection stops being
read while :data:`MAX_WAITING_OPS` wait).
Every frame the server sends goes through the session's
:class:`~wsbroker.outbox.Outbox`, which writes without awaiting and cuts a
client whose unsent bytes pass ``--max-send-buffer`` (SPEC §8): a slow reader
never slows anyone else and never grows memory without bound.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson
from websockets.server import ServerProtocol

from wsbroker import protocol
from wsbroker.auth import AuthError, Identity, Verifier
from wsbroker.backplane import Backplane, BackplaneUnavailable
from wsbroker.batching import FlushScheduler
from wsbroker.config import Settings
from wsbroker.connection import ClientConnection
from wsbroker.expiry import Expiries
from wsbroker.history import HistoryNotEnabled, Position
from wsbroker.hub import Hub, Outgoing
from wsbroker.metrics import Metrics
from wsbroker.outbox import Outbox
from wsbroker.presence import Member, PresenceNotEnabled, PresenceService
from wsbroker.protocol import OpId, ProtocolError
from wsbroker.ratelimit import OpLimiter

if TYPE_CHECKING:
    from wsbroker.webhooks.service import Webhooks

log = logging.getLogger("wsbroker.session")

CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_INTERNAL_ERROR = 1011
CLOSE_SERVICE_RESTART = 1012
CLOSE_UNAUTHORIZED = 4001
CLOSE_DISCONNECTED = 4003
CLOSE_RATE_LIMITED = 4008
CLOSE_SLOW_CONSUMER = 4009

MAX_WAITING_OPS = 16
"""Ops a client may have waiting before its connection stops being read."""

_NO_OPS: deque[str] = deque(maxlen=0)
"""Every session's inbox until its first op: empty, and it stays so."""


@dataclass(frozen=True, slots=True)
class NodeServices:
    """What a session uses of its node; passed in so sessions never import the server."""

    settings: Settings
    hub: Hub
    backplane: Backplane
    verifier: Verifier
    metrics: Metrics
    flusher: FlushScheduler
    presence: PresenceService
    webhooks: Webhooks | None = None
    expiries: Expiries = field(default_factory=Expiries)


class Session:
    """Serves one WebSocket connection from welcome to close."""

    __slots__ = ("_background", "_connection", "_gone", "_inbox", "_limiter", "_node",
                 "_on_finished", "_outbox", "_settings", "_timer", "_worker", "_ws",
                 "address", "channels", "client_id", "deliver", "expiry_second", "identity")

    deliver: Callable[[Outgoing], bool]
    """Queue one frame without awaiting (:meth:`Outbox.put`); False if the client is
    closing. The outbox's own method, not a wrapper: the fan-out calls it once per
    subscriber per message, and a call layer there is measurable."""

    def __init__(
        self,
        node: NodeServices,
        connection: ClientConnection,
        on_finished: Callable[[Session], None],
    ) -> None:
        self._node = node
        self._settings = node.settings
        self._connection = connection
        self._ws = connection.ws
        self.identity = connection.identity
        self.address = connection.address
        self.client_id = secrets.token_urlsafe(12)
        self.channels: list[str] = []
        """Subscribed channels. A list: a client holds a handful (at most
        --max-subscriptions), membership is checked per op, never per message, and an
        idle connection's list costs 56 bytes where a set costs 216."""
        self._limiter = OpLimiter(node.settings.rate_limit)
        self._outbox = Outbox(connection, node.flusher, limit=node.settings.max_send_buffer,
                              on_overflow=self._cut_slow_consumer)
        self.deliver = self._outbox.put
        connection.read_limit = self._outbox
        self._inbox: deque[str] = _NO_OPS
        """Ops waiting their turn (a deque of its own once the client sends one)."""
        self._worker: asyncio.Task[None] | None = None
        self._gone = False
        self._on_finished = on_finished
        self._timer: asyncio.TimerHandle | None = None
        """The first frame's deadline while unauthenticated."""
        self.expiry_second: int | None = None
        """Where the node's expiry registry filed this session (expiry.py)."""
        self._background: set[asyncio.Future[None]] | None = None
        """Presence leaves under way for dropped subscriptions (made at the first)."""

    # -- writing (the rules are the Outbox's) -----------------------------------

    def send(self, payload: bytes) -> None:
        self._outbox.put(Outgoing.of(payload))

    def unsubscribed(self, channel: str, reason: str) -> None:
        """The hub dropped a subscription (SPEC §5 ``unsubscribed``)."""
        if channel in self.channels:
            self.channels.remove(channel)
            self.send(protocol.encode_unsubscribed(channel, reason))
            leaving = asyncio.ensure_future(self._node.presence.leave(channel, self._member()))
            if self._background is None:
                self._background = set()
            self._background.add(leaving)
            leaving.add_done_callback(self._background.discard)

    def _cut_slow_consumer(self) -> None:
        self._node.metrics.messages_dropped.labels("slow_consumer").inc()
        log.info("client %s (%s) is not reading fast enough: more than %d bytes queued; "
                 "closing it with 4009", self.client_id, self.address,
                 self._settings.max_send_buffer)
        self.close_soon(CLOSE_SLOW_CONSUMER, "slow consumer")

    def close_soon(self, code: int, reason: str) -> None:
        """Start the closing handshake now, from any callback (see :meth:`Outbox.close`)."""
        self._outbox.close(code, reason)

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """The upgrade went out: welcome a client that gave its token, or wait for it."""
        if self.identity is not None:
            self._welcome(None)
        else:
            self._timer = asyncio.get_running_loop().call_later(
                self._settings.auth_timeout, self._auth_timed_out)

    def text_received(self, text: str) -> None:
        """Queue one op; a task works through the queue while it is not empty."""
        inbox = self._inbox
        if inbox is _NO_OPS:  # an idle client never pays for a deque's block
            inbox = self._inbox = deque()
        inbox.append(text)
        if self.identity is None and self._timer is not None:
            self._timer.cancel()  # the first frame came in time
            self._timer = None
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work())
        elif len(inbox) >= MAX_WAITING_OPS:
            self._connection.pause_reading()

    def binary_received(self) -> None:
        self._inbox.clear()
        self.close_soon(CLOSE_UNSUPPORTED_DATA, "binary frames are not supported")

    def connection_closed(self) -> None:
        """Nothing more comes in: give back what the client held once the ops it
        sent are done (a publish sent just before closing still goes out, and a
        subscribe that completes late is released too)."""
        self._gone = True
        self._node.expiries.cancel(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._release())

    async def _work(self) -> None:
        """Answer the ops in the inbox, in order, until it is empty.

        Every op the client sent is handled, also once the connection closes:
        its replies then go nowhere, but a publish sent just before a close
        still reaches the channel (as websockets' own layer did).
        """
        inbox = self._inbox
        try:
            while inbox:
                frame = inbox.popleft()
                if self.identity is None:
                    if not await self._authenticate_first(frame):
                        inbox.clear()
                else:
                    await self._handle(frame)
                if len(inbox) < MAX_WAITING_OPS // 2:
                    self._connection.resume_reading()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this task is being stopped: the finally clause still releases
            # Something it awaited was cancelled under it (shutdown): the op failed.
            inbox.clear()
        except Exception:
            # A bug, not the client's fault: say so once, close 1011, count it as such.
            log.exception("client %s (%s): the session failed", self.client_id, self.address)
            inbox.clear()
            self.close_soon(CLOSE_INTERNAL_ERROR, "internal error")
        finally:
            self._inbox = _NO_OPS  # empty now: give its block back until the next op
            self._connection.resume_reading()  # so the close handshake can complete
            if self._gone:
                await self._release()
            else:
                self._worker = None

    def _auth_timed_out(self) -> None:
        self._timer = None
        self._node.metrics.auth_failures.labels("timeout").inc()
        self.close_soon(CLOSE_UNAUTHORIZED, "authentication timed out")

    async def _authenticate_first(self, frame: str) -> bool:
        try:
            op = protocol.parse_op(frame)
        except ProtocolError:
            op = None
        if not isinstance(op, protocol.Auth):
            self._node.metrics.auth_failures.labels("no_auth").inc()
            self.close_soon(CLOSE_UNAUTHORIZED, "authenticate first")
            return False
        try:
            self.identity = await self._node.verifier.verify(op.token)
        except AuthError as exc:
            self._node.metrics.auth_failures.labels(exc.reason).inc()
            self.close_soon(CLOSE_UNAUTHORIZED, str(exc))
            return False
        if not self._gone:
            self._welcome(op.id)
        return True

    def _welcome(self, op_id: OpId) -> None:
        identity = self._require_identity()
        self.send(protocol.encode_welcome(
            self.client_id, identity.user, self._settings.node_id, identity.expires, op_id
        ))
        self._schedule_expiry()
        log.debug("client %s authenticated as %r from %s",
                  self.client_id, identity.user, self.address)

    def _schedule_expiry(self) -> None:
        identity = self._require_identity()
        self._node.expiries.schedule(self, identity.expires + self._settings.jwt_leeway)

    def expired(self) -> None:
        self.close_soon(CLOSE_UNAUTHORIZED, "token expired")

    async def _release(self) -> None:
        """Give back every channel at once: a client of many channels must not leave
        one awaited unsubscribe after another (each may wait on the backplane)."""
        self._node.expiries.cancel(self)  # a refresh during the last op may have filed it
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        channels, self.channels = self.channels, []
        member = self._member() if self.identity is not None else None
        results = await asyncio.gather(
            *(self._leave(channel, member) for channel in channels), return_exceptions=True
        )
        for result in results:
            if isinstance(result, Exception):
                log.warning("releasing a channel of client %s failed: %r",
                            self.client_id, result)
        self._node.metrics.disconnects.labels(_disconnect_label(self._ws)).inc()
        self._on_finished(self)

    def _require_identity(self) -> Identity:
        assert self.identity is not None, "session used before authentication"
        return self.identity

    # -- ops -----------------------------------------------------------------------

    async def _handle(self, frame: str) -> None:
        allowed = self._limiter.allow()
        try:
            op = protocol.parse_op(frame)
        except ProtocolError as exc:
            if allowed:
                self.send(protocol.encode_error(exc.op_id, exc.code, exc.message))
            else:
                self._reject_rate_limited(exc.op_id)
            return
        if not allowed:
            self._reject_rate_limited(op.id)
            return
        try:
            reply = await self._dispatch(op)
        except ProtocolError as exc:
            reply = protocol.encode_error(op.id, exc.code, exc.message)
        except BackplaneUnavailable:
            reply = protocol.encode_error(
                op.id, "unavailable", "the backplane is unavailable; retry shortly"
            )
        if reply is not None:
            self.send(reply)

    def _reject_rate_limited(self, op_id: OpId) -> None:
        self.send(protocol.encode_error(op_id, "rate_limited", "too many operations; slow down"))
        if self._limiter.abusive:
            log.info("client %s (%s) kept exceeding the rate limit; closing it with 4008",
                     self.client_id, self.address)
            self.close_soon(CLOSE_RATE_LIMITED, "rate limited")

    async def _dispatch(self, op: protocol.Op) -> bytes | None:
        match op:
            case protocol.Subscribe():
                return await self._subscribe(op)
            case protocol.Unsubscribe():
                return await self._unsubscribe(op)
            case protocol.Publish():
                return await self._publish(op)
            case protocol.History():
                return await self._history(op)
            case protocol.Auth():
                await self._refresh(op)
                return None
            case protocol.Ping():
                return protocol.encode_ok(op.id)
            case protocol.Presence() | protocol.PresenceStats():
                return await self._presence(op)

    def _may_read(self, channel: str) -> bool:
        identity = self._require_identity()
        return identity.channels.matches(channel) or self._settings.public_channels.matches(
            channel
        )

    def _check_read(self, op_id: OpId, channel: str) -> None:
        if not self._may_read(channel):
            raise ProtocolError("forbidden", f"token does not allow channel {channel!r}", op_id)

    async def _subscribe(self, op: protocol.Subscribe) -> bytes | None:
        self._check_read(op.id, op.channel)
        if op.channel in self.channels:
            position = self._node.hub.position(op.channel)
            fields = position.already_live(op.since).fields() if position is not None else {}
            return protocol.encode_ok(op.id, channel=op.channel, **fields)
        if len(self.channels) >= self._settings.max_subscriptions:
            raise ProtocolError(
                "too_many_subscriptions",
                f"at most {self._settings.max_subscriptions} subscriptions per connection",
                op.id,
            )

        def confirm(position: Position | None) -> None:
            # Sent by the hub right before the replay and live messages: ok comes first.
            if op.channel not in self.channels:
                self.channels.append(op.channel)
            fields = position.fields() if position is not None else {}
            self.send(protocol.encode_ok(op.id, channel=op.channel, **fields))

        # The member is recorded first: should that fail, nothing was subscribed; should
        # the subscribe fail, the member leaves again. Either way the client gets an error.
        member = self._member()
        await self._node.presence.join(op.channel, member)
        try:
            await self._node.hub.subscribe(op.channel, self, op.since, confirm)
        except BaseException:
            await self._node.presence.leave(op.channel, member)
            raise
        return None

    async def _leave(self, channel: str, member: Member | None) -> None:
        await self._node.hub.unsubscribe(channel, self)
        if member is not None:
            await self._node.presence.leave(channel, member)

    async def _unsubscribe(self, op: protocol.Unsubscribe) -> bytes:
        if op.channel in self.channels:
            self.channels.remove(op.channel)
            await self._node.hub.unsubscribe(op.channel, self)
            await self._node.presence.leave(op.channel, self._member())
        return protocol.encode_ok(op.id, channel=op.channel)

    async def _publish(self, op: protocol.Publish) -> bytes:
        identity = self._require_identity()
        if not identity.publish.matches(op.channel):
            raise ProtocolError(
                "forbidden", f"token does not allow publishing to {op.channel!r}", op.id
            )
        published = await self._node.hub.publish(op.channel, op.data, identity.user)
        if self._node.webhooks is not None:
            self._node.webhooks.client_publish(op.channel, identity.user, op.data)
        if published.offset is None:
            return protocol.encode_ok(op.id, channel=op.channel)
        return protocol.encode_ok(op.id, channel=op.channel, offset=published.offset)

    async def _history(self, op: protocol.History) -> bytes:
        self._check_read(op.id, op.channel)
        try:
            page = await self._node.hub.history(op.channel, op.limit)
        except HistoryNotEnabled as exc:
            raise ProtocolError("not_enabled", str(exc), op.id) from None
        return protocol.encode_ok(
            op.id, channel=op.channel, messages=[orjson.Fragment(m) for m in page.messages],
            offset=page.offset, epoch=page.epoch,
        )

    def _member(self) -> Member:
        """This connection as presence shows it, from its current token."""
        identity = self._require_identity()
        return Member.of(self.client_id, identity.user, identity.info)

    async def _presence(self, op: protocol.Presence | protocol.PresenceStats) -> bytes:
        self._check_read(op.id, op.channel)
        presence = self._node.presence
        try:
            if isinstance(op, protocol.PresenceStats):
                stats = await presence.stats(op.channel)
                return protocol.encode_ok(op.id, channel=op.channel, clients=stats.clients,
                                          users=stats.users)
            members = await presence.members_json(op.channel)
        except PresenceNotEnabled as exc:
            raise ProtocolError("not_enabled", str(exc), op.id) from None
        return protocol.encode_ok(op.id, channel=op.channel,
                                  members=[orjson.Fragment(member) for member in members])

    async def _refresh(self, op: protocol.Auth) -> None:
        identity = self._require_identity()
        try:
            fresh = await self._node.verifier.verify(op.token)
        except AuthError as exc:
            self._node.metrics.auth_failures.labels(exc.reason).inc()
            raise ProtocolError("unauthorized", str(exc), op.id) from None
        if fresh.user != identity.user:
            raise ProtocolError("forbidden", "a refreshed token must have the same 'sub'", op.id)
        self.identity = fresh
        self._schedule_expiry()
        member = self._member()
        kept = sorted(channel for channel in self.channels if self._may_read(channel))
        if fresh.info != identity.info:  # others see the new info by the time of the ok
            await asyncio.gather(*(self._node.presence.update(channel, member)
                                   for channel in kept))
        self.send(protocol.encode_ok(op.id, expires=fresh.expires))
        for channel in sorted(set(self.channels).difference(kept)):
            if channel in self.channels:  # not dropped by the hub meanwhile
                self.channels.remove(channel)
            await self._leave(channel, member)
            self.send(protocol.encode_unsubscribed(channel, "forbidden"))
        return None


_KNOWN_CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
     CLOSE_UNAUTHORIZED, CLOSE_DISCONNECTED, CLOSE_RATE_LIMITED, CLOSE_SLOW_CONSUMER}
)


def _disconnect_label(ws: ServerProtocol) -> str:
    """The close code for the metric: ours when we closed, else the client's, bounded.

    A client picks its own close code; unknown ones share one label so that no
    client can mint metric series at will.
    """
    frame = ws.close_sent if ws.close_sent is not None else ws.close_rcvd
    code = frame.code if frame is not None else 1006
    return str(code) if code in _KNOWN_CLOSE_CODES else "other"
