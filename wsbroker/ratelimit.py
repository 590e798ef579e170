"""Per-connection op rate limiting: a token bucket plus an abuse detector (SPEC §8)."""

from __future__ import annotations

import math
import time

from wsbroker.config import RateLimit

ABUSE_SECONDS = 5
"""Rejections in this many consecutive seconds mark a client as abusive (close 4008)."""


class OpLimiter:
    """Decides, op by op, whether a connection may go on.

    ``allow()`` spends one token; when it returns False the op is answered
    with ``rate_limited``. ``abusive`` turns True once ops were rejected in
    each of :data:`ABUSE_SECONDS` consecutive wall seconds, so a client that
    merely bursts now and then is never disconnected.
    """

    __slots__ = ("_burst", "_last_refill", "_last_reject_second", "_rate", "_streak", "_tokens")

    def __init__(self, limit: RateLimit, clock: float | None = None) -> None:
        self._rate = limit.rate
        self._burst = limit.burst
        self._tokens = limit.burst
        self._last_refill = time.monotonic() if clock is None else clock
        self._last_reject_second = -2
        self._streak = 0

    def allow(self, now: float | None = None) -> bool:
        if self._rate <= 0:
            return True
        now = time.monotonic() if now is None else now
        self._tokens = min(self._burst, self._tokens + (now - self._last_refill) * self._rate)
        self._last_refill = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        second = math.floor(now)
        if second != self._last_reject_second:
            consecutive = second == self._last_reject_second + 1
            self._streak = self._streak + 1 if consecutive else 1
            self._last_reject_second = second
        return False

    @property
    def abusive(self) -> bool:
        return self._streak >= ABUSE_SECONDS
