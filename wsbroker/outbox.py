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
* our close frame goes out right behind what is queued (the connection then
  gives the client :data:`~wsbroker.connection.CLOSE_TIMEOUT` to complete it).
"""

from __future__ import annotations

from collections.abc import Callable

from websockets.protocol import State

from wsbroker.batching import FlushScheduler
from wsbroker.connection import ClientConnection
from wsbroker.hub import Outgoing

EARLY_FLUSH_BYTES = 64 * 1024
"""Frames queued in one turn beyond this go to the socket at once, so the
slow-consumer limit keeps measuring what the client has not read."""


class Outbox:
    """The outgoing side of one connection: queue, flush, bound, close."""

    __slots__ = ("_compressed", "_connection", "_cut", "_flush_scheduled", "_flusher",
                 "_limit", "_on_overflow", "_queue", "_queued", "_transport", "_ws")

    def __init__(self, connection: ClientConnection, flusher: FlushScheduler, *,
                 limit: int, on_overflow: Callable[[], None]) -> None:
        self._connection = connection
        self._ws = connection.ws
        self._transport = connection.transport
        self._compressed = bool(connection.ws.extensions)
        self._flusher = flusher
        self._limit = limit
        self._on_overflow = on_overflow
        self._queue: list[bytes] = []
        self._queued = 0
        self._flush_scheduled = False
        self._cut = False

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
                self._connection.send_pending()
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
            self._connection.stop_reading()
        if not self._cut:
            self._overflow()

    def _overflow(self) -> None:
        self._cut = True
        self._on_overflow()

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake now, from any callback (timers, fan-out, drain):
        the close frame is written straight after whatever is queued."""
        if self._ws.state is State.OPEN and self._queue:
            self._write_queue()
        self._connection.close(code, reason)
