"""Backplanes carry published messages between nodes: one interface, several engines."""

from __future__ import annotations

from wsbroker.backplane.base import Backplane, BackplaneUnavailable, MessageHandler, StateHandler
from wsbroker.config import Settings


def create_backplane(settings: Settings) -> Backplane:
    """The engine the settings ask for: Redis (or Redis Cluster) when a URL is set."""
    if settings.redis_url and settings.redis_cluster:
        from wsbroker.backplane.cluster import ClusterBackplane

        return ClusterBackplane(settings)
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
