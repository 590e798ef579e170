"""Token expiry for every session of a node: one timer per second that has expiries
due, not one timer per connection.

A timer per connection cost about 600 bytes of it (an event-loop timer, its
bound callback and arguments), a tenth of an idle connection. Sessions are
instead grouped by the whole second their token runs out in (expiry plus the
leeway, rounded up), and each second with sessions due holds one timer. A
session is closed at most a second late; refreshing or leaving moves it out
of its second in O(1).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Protocol

log = logging.getLogger("wsbroker.expiry")


class Expiring(Protocol):
    expiry_second: int | None
    """The second this session is filed under (None: not filed); the registry's own."""

    def expired(self) -> None:
        """The token ran out: close the connection (4001)."""
        ...


class Expiries:
    """Sessions by the second their token expires in; each second's timer closes them."""

    __slots__ = ("_due", "_timers")

    def __init__(self) -> None:
        self._due: dict[int, set[Expiring]] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}

    def schedule(self, session: Expiring, deadline: float) -> None:
        """Close ``session`` once the wall clock passes ``deadline`` (epoch seconds)."""
        self.cancel(session)
        second = math.ceil(deadline)
        due = self._due.get(second)
        if due is None:
            due = self._due[second] = set()
            delay = max(second - time.time(), 0.0)
            self._timers[second] = asyncio.get_running_loop().call_later(
                delay, self._fire, second)
        due.add(session)
        session.expiry_second = second

    def cancel(self, session: Expiring) -> None:
        second = session.expiry_second
        if second is None:
            return
        session.expiry_second = None
        due = self._due.get(second)
        if due is None:
            return
        due.discard(session)
        if not due:
            del self._due[second]
            self._timers.pop(second).cancel()

    def _fire(self, second: int) -> None:
        self._timers.pop(second, None)
        for session in self._due.pop(second, ()):
            session.expiry_second = None
            try:
                session.expired()
            except Exception:  # one failure must not spare the rest of the second
                log.exception("closing a session whose token expired failed")

    def close(self) -> None:
        """Node shutdown: no timer outlives it."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._due.clear()
