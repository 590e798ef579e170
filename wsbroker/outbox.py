"""Everything a node sends to one client, and the rules that bound it (SPEC §8).

Frames are written without awaiting, so one slow reader never slows the
fan-out; the price is that unsent bytes wait in the transport's buffer, and a
client that stops reading must be cut before that buffer grows without bound.
The rules live here, each in one place:

* nothing is sent after the closing handshake started;
* frames queued in one loop turn leave in one write (see batching.py), and a
  burst past :data:`EARLY_FLUSH_BYTES` goes to the kernel at once, so the limit
  keeps measuring what the client has not read;
* a compressed connection frames each message at once (its deflate context is
  per connection, so the shared pre-framed bytes cannot be used);
* the send-buffer limit (``--max-send-buffer``) holds whoever wrote the bytes:
  our frames, checked at each turn's first frame, and websockets' own control
  frames (the PONG it owes for every PING), checked after each read;
* a close aborts the connection if the client has not completed the handshake
  within :data:`CLOSE_TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

from wsbroker.batching import FlushScheduler
from wsbroker.hub import Outgoing

log = logging.getLogger("wsbroker.session")

CLOSE_TIMEOUT = 5.0
"""Seconds a client has to answer our close frame before the connection is dropped."""

EARLY_FLUSH_BYTES = 64 * 1024
"""Frames queued in one turn beyond this go to the socket at once, so the
slow-consumer limit keeps measuring what the client has not read."""

MAX_CLOSE_REASON_BYTES = 123  # a close frame is a control frame: 125 bytes with the code


class Outbox:
    """The outgoing side of one connection: queue, flush, bound, close."""

    __slots__ = ("_closing", "_compressed", "_connection", "_cut", "_flush_scheduled",
                 "_flusher", "_label", "_limit", "_on_overflow", "_queue", "_queued",
                 "_transport", "_ws")

    def __init__(self, connection: ServerConnection, flusher: FlushScheduler, *,
                 limit: int, on_overflow: Callable[[], None], label: str) -> None:
        self._connection = connection
        self._ws = connection.protocol
        self._transport = connection.transport
        self._compressed = bool(connection.protocol.extensions)
        self._flusher = flusher
        self._limit = limit
        self._on_overflow = on_overflow
        self._label = label
        self._queue: list[bytes] = []
        self._queued = 0
        self._flush_scheduled = False
        self._cut = False
        self._closing: asyncio.TimerHandle | None = None

    def put(self, message: Outgoing) -> bool:
        """Queue one frame without awaiting; False if the client takes nothing more.

        The client is checked once per turn, at its first frame: closing, or
        more than the limit unsent (an O(1) read of the transport's buffer
        size, with no timer per client). The queue list is reused, so a
        delivery allocates nothing for the garbage collector.
        """
        queue = self._queue
        if not queue:
            if self._cut or self._ws.state is not State.OPEN:
                return False
            if self._transport.get_write_buffer_size() > self._limit:
                self._overflow()
                return False
            if self._compressed:  # a per-connection deflate context: frame it now
                self._ws.send_text(message.payload)
                self._connection.send_data()
                return True
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._flusher.schedule(self)
        queue.append(message.wire)
        self._queued += len(message.wire)
        if self._queued >= EARLY_FLUSH_BYTES:  # a big burst: let the kernel take it now
            self._write_queue()
        return True

    def flush(self) -> None:
        """Write the frames queued this turn in one system call."""
        self._flush_scheduled = False
        if self._queue:
            self._write_queue()

    def _write_queue(self) -> None:
        queue = self._queue
        if self._ws.state is State.OPEN:
            if len(queue) == 1:
                self._transport.write(queue[0])
            else:
                self._transport.writelines(queue)
        queue.clear()
        self._queued = 0

    def after_read(self, wrote: bool) -> None:
        """Websockets has answered what it read (PONGs, a close): hold the limit for it too.

        A client that floods PINGs and never reads would otherwise make the node
        queue PONGs without bound. When its own frames made us write past the
        limit, it is no longer read (whatever it sends next could only add more);
        a client merely behind on our frames is still read, so it can complete
        the close.
        """
        if self._transport.get_write_buffer_size() <= self._limit:
            return
        if wrote:
            self._transport.pause_reading()
        if not self._cut:
            self._overflow()

    def _overflow(self) -> None:
        self._cut = True
        self._on_overflow()

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake now, from any callback (timers, fan-out, drain).

        The close frame is written straight after whatever is queued, and the
        connection is aborted if the client has not completed the handshake
        within :data:`CLOSE_TIMEOUT`. (websockets' own ``close()`` first waits
        for the send buffer to drain, without a deadline: a client that stopped
        reading would hold its connection and buffer forever.)
        """
        if self._closing is not None:
            return
        loop = asyncio.get_running_loop()
        self._closing = loop.call_later(CLOSE_TIMEOUT, self._abort)
        if self._ws.state is State.OPEN:
            if self._queue:
                self._write_queue()
            self._ws.send_close(code, fit_close_reason(reason))
            self._connection.send_data()

    def _abort(self) -> None:
        if not self._connection.connection_lost_waiter.done():
            log.info("%s did not complete the closing handshake in %.0fs; "
                     "dropping the connection", self._label, CLOSE_TIMEOUT)
            self._transport.abort()

    def discard(self) -> None:
        """The connection is gone: stop the abort timer."""
        if self._closing is not None:
            self._closing.cancel()


def fit_close_reason(reason: str) -> str:
    """Shorten ``reason`` to what a close frame can carry, on a character boundary."""
    encoded = reason.encode()
    if len(encoded) <= MAX_CLOSE_REASON_BYTES:
        return reason
    return encoded[: MAX_CLOSE_REASON_BYTES - 3].decode(errors="ignore") + "..."


class Connection(ServerConnection):
    """A server connection that lets its outbox check the limit after each read."""

    outbox: Outbox | None = None

    def data_received(self, data: bytes) -> None:
        outbox = self.outbox
        if outbox is None:
            super().data_received(data)
            return
        before = self.transport.get_write_buffer_size()
        super().data_received(data)
        outbox.after_read(self.transport.get_write_buffer_size() > before)
