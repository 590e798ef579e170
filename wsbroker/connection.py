"""One client's TCP connection, served on websockets' Sans-I/O protocol.

websockets' asyncio layer gives every connection a handler task and a keepalive
task, a message assembler with its futures and locks, and keeps the HTTP
request and response for the connection's life: about 12 KiB and a few
microseconds per connection before wsbroker adds anything of its own. Here a
connection is one asyncio ``Protocol`` around websockets' ``ServerProtocol``,
which still does all of the parsing, framing, size limits, PONGs and the
closing handshake. What the asyncio layer did besides is done here, each rule
in one place:

* the opening handshake must arrive and be answered within
  :data:`HANDSHAKE_TIMEOUT`; the node's verdict runs without a task unless it
  has to wait (a key fetch);
* text messages are put together from their fragments and decoded (invalid
  UTF-8 closes 1007); ``max_size`` holds across fragments (``ServerProtocol``);
* what websockets owes the client (PONGs, a close echo) is written after each
  read, and the send-buffer limit is checked right after (see outbox.py);
* once our close frame is out, the client has :data:`CLOSE_TIMEOUT` to
  complete the handshake, or the connection is aborted;
* keepalive is one sweep for the whole node (keepalive.py), not a task each;
* reading pauses while the session has too many ops waiting (session.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Protocol, cast

from websockets.extensions import ServerExtensionFactory
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

if TYPE_CHECKING:
    from wsbroker.auth import Identity

log = logging.getLogger("wsbroker.connection")
websockets_log = logging.getLogger("websockets.server")

HANDSHAKE_TIMEOUT = 10.0
"""Seconds from TCP accept to our answer to the upgrade request."""

CLOSE_TIMEOUT = 5.0
"""Seconds a client has to answer our close frame before the connection is dropped."""

SERVER_NAME = "wsbroker"

MAX_CLOSE_REASON_BYTES = 123  # a close frame is a control frame: 125 bytes with the code

Verdict = Response | None
"""The node's answer to an upgrade request: None accepts it, a response refuses it."""


class Gate(Protocol):
    """What a connection asks of its node."""

    def connected(self, connection: ClientConnection) -> None:
        """TCP (and TLS) is up; ``closed`` follows, once. A TLS handshake that
        fails never gets this far, and asyncio never tells the connection."""
        ...

    def handshake(self, connection: ClientConnection,
                  request: Request) -> Verdict | Awaitable[Verdict]:
        """Accept (None) or refuse (a response) ``request``, at once or later."""
        ...

    def open(self, connection: ClientConnection) -> Peer:
        """The upgrade went out: the session that serves the connection from now on."""
        ...

    def closed(self, connection: ClientConnection) -> None:
        """The connection is gone, whatever its state (called once)."""
        ...


class Peer(Protocol):
    """What a connection hands to its session."""

    def text_received(self, text: str) -> None:
        """A complete text message."""
        ...

    def binary_received(self) -> None:
        """A binary message began (the protocol has none)."""
        ...

    def connection_closed(self) -> None:
        """The connection is gone; nothing more will be received or sent."""
        ...


class ReadLimit(Protocol):
    def after_read(self, wrote: bool) -> None:
        """websockets wrote what a read asked for (PONGs): hold the send-buffer limit."""
        ...


class ConnectionOptions:
    """What every connection of a node is built with."""

    __slots__ = ("extensions", "max_size")

    def __init__(self, max_size: int, extensions: Sequence[ServerExtensionFactory]) -> None:
        self.max_size = max_size
        self.extensions = list(extensions)


class ClientConnection(asyncio.Protocol):
    """A client connection from the accepted socket to ``connection_lost``."""

    __slots__ = ("_eof_written", "_fragments", "_gate", "_handshake", "_loop", "_lost", "_paused",
                 "_reading_stopped", "_timer", "address", "admitted", "identity", "last_heard",
                 "peer", "pinged_at", "read_limit", "transport", "ws")

    def __init__(self, gate: Gate, options: ConnectionOptions) -> None:
        self._gate = gate
        self.ws = ServerProtocol(extensions=options.extensions, max_size=options.max_size,
                                 logger=websockets_log)
        self.transport: asyncio.Transport = cast(asyncio.Transport, None)
        self._loop = asyncio.get_running_loop()
        self.peer: Peer | None = None
        self.read_limit: ReadLimit | None = None
        self.identity: Identity | None = None
        """Who the token given at the upgrade proved the client to be, if it gave one."""
        self.address = "?"
        self.admitted = False
        """Counted against --max-connections (the node's to set and clear)."""
        """The client's address (the X-Forwarded-For client behind a trusted proxy)."""
        self.last_heard = 0.0
        self.pinged_at = 0.0
        self._fragments: list[bytes] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._handshake: asyncio.Task[None] | None = None
        self._lost: asyncio.Future[None] | bool = False
        self._paused = False
        self._reading_stopped = False
        self._eof_written = False

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.address = str(peer[0])
        self.last_heard = self._loop.time()
        self._timer = self._loop.call_later(HANDSHAKE_TIMEOUT, self._handshake_timed_out)
        self._gate.connected(self)

    def data_received(self, data: bytes) -> None:
        self.last_heard = self._loop.time()
        ws = self.ws
        # Messages are read unless the closing handshake had begun before this
        # read: a close frame later in this same read (a client's send() then
        # close()) must not make the node drop what preceded it.
        closing = self.peer is not None and ws.state is not State.OPEN
        ws.receive_data(data)
        events = ws.events_received()
        transport = self.transport
        before = transport.get_write_buffer_size()
        self.send_pending()
        if self.read_limit is not None:
            self.read_limit.after_read(transport.get_write_buffer_size() > before)
        for event in events:
            if type(event) is Frame:
                if self.peer is not None and not closing:
                    self._frame(event)
            else:
                self._request(cast(Request, event))

    def eof_received(self) -> None:
        self.ws.receive_eof()
        self.send_pending()
        # Returning None closes the transport: nothing is written after a peer's EOF.

    def connection_lost(self, exc: Exception | None) -> None:
        self.ws.receive_eof()  # idempotent; the state is CLOSED from here on
        self.ws.data_to_send()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        lost, self._lost = self._lost, True
        if isinstance(lost, asyncio.Future) and not lost.done():
            lost.set_result(None)
        self._gate.closed(self)
        if self.peer is not None:
            self.peer.connection_closed()

    # -- the opening handshake ---------------------------------------------------

    def _request(self, request: Request) -> None:
        try:
            verdict = self._gate.handshake(self, request)
        except Exception:
            log.exception("the handshake of a client from %s failed", self.address)
            verdict = _internal_error(self.ws)
        if isinstance(verdict, Awaitable):
            self._handshake = self._loop.create_task(self._await_verdict(request, verdict))
        else:
            self._respond(request, verdict)

    async def _await_verdict(self, request: Request, pending: Awaitable[Verdict]) -> None:
        try:
            verdict = await pending
        except Exception:
            log.exception("the handshake of a client from %s failed", self.address)
            verdict = _internal_error(self.ws)
        finally:
            self._handshake = None
        try:
            self._respond(request, verdict)
        except Exception:  # nothing may be left half-answered
            log.exception("answering the upgrade of a client from %s failed", self.address)
            self.transport.abort()

    def _respond(self, request: Request, verdict: Verdict) -> None:
        ws = self.ws
        if self._lost is True or ws.state is not State.CONNECTING:
            return  # the client left (or timed out) while the node decided
        if ws.eof_sent:
            # What followed the request was no WebSocket frame (a second request,
            # stray bytes): websockets gave up on the connection; so do we.
            self.transport.abort()
            return
        response = ws.accept(request) if verdict is None else verdict
        response.headers["Server"] = SERVER_NAME
        ws.send_response(response)
        # websockets' parser keeps the request object for the connection's life:
        # keep none of its contents (2-3 KiB a connection, and perhaps a token).
        request.path = ""
        request.headers.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.send_pending()
        if self.is_open:  # a 101 went out
            self.peer = self._gate.open(self)

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self.ws.state is State.CONNECTING:
            log.info("a client from %s did not complete the upgrade in %.0f s; dropping it",
                     self.address, HANDSHAKE_TIMEOUT)
            self.transport.abort()

    # -- frames in -------------------------------------------------------------------

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT:
            if frame.fin:
                self._text(frame.data)
            else:
                self._fragments = [bytes(frame.data)]
        elif opcode is Opcode.CONT:
            fragments = self._fragments
            if fragments is None:
                return
            fragments.append(bytes(frame.data))
            if frame.fin:
                self._fragments = None
                self._text(b"".join(fragments))
        elif opcode is Opcode.BINARY:
            self._fragments = None
            assert self.peer is not None
            self.peer.binary_received()
        # PING, PONG and CLOSE: websockets has answered them (send_pending above).

    def _text(self, data: bytes | bytearray | memoryview) -> None:
        try:
            text = str(data, "utf-8")
        except UnicodeDecodeError as exc:
            self.ws.fail(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
            self.send_pending()
            return
        assert self.peer is not None
        self.peer.text_received(text)

    # -- bytes out -------------------------------------------------------------------

    def send_pending(self) -> None:
        """Write what websockets has framed (a half-close after the closing handshake)."""
        transport = self.transport
        for data in self.ws.data_to_send():
            if self._eof_written or transport.is_closing():
                continue  # nothing goes out after our end of the stream
            if data:
                transport.write(data)
                continue
            self._eof_written = True
            if transport.can_write_eof():
                try:
                    transport.write_eof()
                except Exception:  # uvloop may raise RuntimeError on a closing transport
                    transport.close()
            else:  # TLS: no half-close
                transport.close()
        if self._timer is None and self._lost is not True and self.ws.close_expected():
            self._timer = self._loop.call_later(CLOSE_TIMEOUT, self._close_timed_out)

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake now; the connection is aborted if the client
        has not completed it within :data:`CLOSE_TIMEOUT`.

        (websockets' own ``close()`` first waits for the send buffer to drain, with
        no deadline: a client that stopped reading would hold its connection and
        its buffer forever.)
        """
        if self.ws.state is State.OPEN:
            self.ws.send_close(code, fit_close_reason(reason))
            self.send_pending()
        elif self.ws.state is State.CONNECTING and self._lost is not True:
            self.transport.abort()

    def fail(self, code: int, reason: str) -> None:
        """Close at once: the close frame goes out and the TCP connection with it."""
        if self.ws.state is State.OPEN:
            self.ws.fail(code, reason)
            self.send_pending()

    def ping(self) -> None:
        if self.ws.state is State.OPEN:
            self.ws.send_ping(b"")
            self.send_pending()

    def _close_timed_out(self) -> None:
        self._timer = None
        if self._lost is not True:
            log.info("a client from %s did not complete the closing handshake in %.0f s; "
                     "dropping the connection", self.address, CLOSE_TIMEOUT)
            self.transport.abort()

    # -- reading --------------------------------------------------------------------

    def pause_reading(self) -> None:
        """Stop reading for now: the session has enough ops waiting."""
        if not self._paused and self._lost is not True:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and not self._reading_stopped and self._lost is not True:
            self._paused = False
            self.transport.resume_reading()

    def stop_reading(self) -> None:
        """Never read again (a flood that would only add to what we owe it)."""
        self._reading_stopped = True
        self.pause_reading()

    # -- state ---------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.ws.state is State.OPEN

    async def wait_lost(self) -> None:
        """Until ``connection_lost`` (a future is made only for those who wait)."""
        if self._lost is True:
            return
        if self._lost is False:
            self._lost = self._loop.create_future()
        await asyncio.shield(self._lost)


def _internal_error(ws: ServerProtocol) -> Response:
    return ws.reject(500, "Failed to open a WebSocket connection.\n"
                          "See server log for more information.\n")


def fit_close_reason(reason: str) -> str:
    """Shorten ``reason`` to what a close frame can carry, on a character boundary."""
    encoded = reason.encode()
    if len(encoded) <= MAX_CLOSE_REASON_BYTES:
        return reason
    return encoded[: MAX_CLOSE_REASON_BYTES - 3].decode(errors="ignore") + "..."
