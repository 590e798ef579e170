"""The flush scheduler: one flush per dirty client per loop turn, failures isolated."""

from __future__ import annotations

import asyncio

from wsbroker.batching import FlushScheduler


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.flushes = 0
        self.fail = fail

    def flush(self) -> None:
        self.flushes += 1
        if self.fail:
            raise OSError("transport gone")


async def test_each_scheduled_client_is_flushed_once_at_the_end_of_the_turn() -> None:
    scheduler = FlushScheduler()
    first, second = Recorder(), Recorder()
    scheduler.schedule(first)
    scheduler.schedule(second)
    assert first.flushes == second.flushes == 0  # nothing before the turn ends
    await asyncio.sleep(0)
    assert first.flushes == second.flushes == 1


async def test_a_failing_flush_does_not_strand_the_others() -> None:
    scheduler = FlushScheduler()
    broken, healthy = Recorder(fail=True), Recorder()
    scheduler.schedule(broken)
    scheduler.schedule(healthy)
    await asyncio.sleep(0)
    assert healthy.flushes == 1
    scheduler.schedule(healthy)  # the scheduler still works afterwards
    await asyncio.sleep(0)
    assert healthy.flushes == 2
