"""Backplanes carry published messages between nodes: one interface, several engines."""

from __future__ import annotations

from wsbroker.backplane.base import Backplane, BackplaneUnavailable, MessageHandler, StateHandler
from wsbroker.config import Settings


def create_backplane(settings: Settings) -> Backplane:
    """The engine the settings ask for: Redis when a URL is set, else in-process."""
    if settings.redis_url:
        from wsbroker.backplane.redis import RedisBackplane

        return RedisBackplane(settings)
    from wsbroker.backplane.memory import MemoryBackplane

    return MemoryBackplane()


__all__ = [
    "Backplane",
    "BackplaneUnavailable",
    "MessageHandler",
    "StateHandler",
    "create_backplane",
]
