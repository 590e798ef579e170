"""The node's expiry registry: sessions grouped by second, one timer per second."""

from __future__ import annotations

import asyncio
import time

from tests.helpers import WAIT
from wsbroker.expiry import Expiries


class Token:
    """A session as the registry sees it: where it is filed, and what expiry does."""

    def __init__(self) -> None:
        self.expiry_second: int | None = None
        self.expired_at: float | None = None
        self.done = asyncio.Event()

    def expired(self) -> None:
        self.expired_at = time.time()
        self.done.set()


async def test_sessions_expire_within_a_second_of_their_deadline_sharing_timers() -> None:
    expiries = Expiries()
    deadline = time.time() + 0.3
    first, second, moved, left = Token(), Token(), Token(), Token()
    for token in (first, second, moved, left):
        expiries.schedule(token, deadline)
    assert len(expiries._timers) == 1  # one timer for the whole second
    expiries.schedule(moved, deadline + 3600)  # a refresh
    expiries.cancel(left)  # the client left
    await asyncio.wait_for(asyncio.gather(first.done.wait(), second.done.wait()), WAIT)
    for token in (first, second):
        assert token.expired_at is not None
        assert deadline <= token.expired_at < deadline + 1.2
        assert token.expiry_second is None
    assert moved.expired_at is None and moved.expiry_second is not None
    assert left.expired_at is None and left.expiry_second is None
    assert list(expiries._timers) == [moved.expiry_second]
    expiries.close()
    assert not expiries._timers


async def test_a_deadline_already_past_expires_at_once() -> None:
    expiries = Expiries()
    token = Token()
    expiries.schedule(token, time.time() - 5)
    await asyncio.wait_for(token.done.wait(), WAIT)
