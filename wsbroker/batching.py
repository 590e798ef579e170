"""Write coalescing: one system call per client per event-loop turn, not per frame.

A burst read from Redis fans out many messages in one loop turn; writing each
frame to each socket would cost one ``send()`` per frame per client, and that
kernel work dominates fan-out. Instead a session's outbox (outbox.py) queues
frames in a list and registers itself here once; at the end of the turn every queued list is
written with one ``writelines`` call per client.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

log = logging.getLogger("wsbroker.batching")


class Flushable(Protocol):
    def flush(self) -> None:
        """Write everything queued, now."""
        ...


class FlushScheduler:
    """Runs ``flush()`` once for every session that queued frames this turn."""

    __slots__ = ("_dirty", "_loop")

    def __init__(self) -> None:
        self._dirty: list[Flushable] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def schedule(self, session: Flushable) -> None:
        """Flush ``session`` at the end of this turn (call once per batch)."""
        if not self._dirty:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._flush_all)
        self._dirty.append(session)

    def _flush_all(self) -> None:
        dirty, self._dirty = self._dirty, []
        for session in dirty:
            try:
                session.flush()
            except Exception:  # one broken transport must not strand the others
                log.exception("flushing a client's frames failed")
