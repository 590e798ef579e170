"""The benchmark message: what the publisher stamps and the subscribers read back.

Each message is a compact JSON object ``{"r":step,"s":seq,"t":time_ns,"p":"x…"}``:
``r`` tells one measuring step from the next (stragglers of an earlier step are
counted as late, not delivered), ``s`` counts per channel from 1 (so gaps,
duplicates and reorders show), and ``t`` is the publisher's wall clock in
nanoseconds (so latency is only meaningful when both ends share a clock, or
clocks synchronised well below the latencies measured).
"""

from __future__ import annotations

import re
import time

MESSAGE_RE = re.compile(rb'"r":\s*(\d+),\s*"s":\s*(\d+),\s*"t":\s*(\d+)')
"""Finds (step, seq, time) in a frame with one regex search: no JSON parse per delivery."""

time_ns = time.time_ns


def message(step: int, seq: int, size: int) -> bytes:
    """A compact JSON object of ``size`` bytes stamped with the publish time."""
    body = b'{"r":%d,"s":%d,"t":%d,"p":"' % (step, seq, time_ns())
    return body + b"x" * max(0, size - len(body) - 2) + b'"}'


def channel_of(index: int, channels: int) -> tuple[int, int]:
    """Message ``index`` of a round-robin run: (its channel number, its seq there)."""
    return index % channels, index // channels + 1
