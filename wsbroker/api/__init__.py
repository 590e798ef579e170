"""The HTTP API for backend services (SPEC §12), on its own port.

``keys`` (which requests may enter), ``body`` (reading JSON at a bounded cost),
``errors`` (every refusal as JSON), ``routes`` (the endpoints over the node's
services), ``idempotency`` (publish once per key), ``server`` (aiohttp, limits,
metrics).
"""

from __future__ import annotations

from wsbroker.api.idempotency import Idempotency, MemoryIdempotency, RedisIdempotency
from wsbroker.api.routes import Routes
from wsbroker.api.server import ApiServer
from wsbroker.config import Settings
from wsbroker.control import Control
from wsbroker.hub import Hub
from wsbroker.metrics import Metrics
from wsbroker.presence import PresenceService
from wsbroker.registry import AnyRedis, Registry

__all__ = ["ApiServer", "create_api"]


def create_api(settings: Settings, hub: Hub, control: Control, registry: Registry,
               presence: PresenceService, redis: AnyRedis | None,
               metrics: Metrics) -> ApiServer:
    """The API over a node's services; idempotency is fleet-wide when the node has Redis."""
    idempotency: Idempotency = (
        RedisIdempotency(redis, settings.redis_prefix) if redis is not None
        else MemoryIdempotency()
    )
    return ApiServer(settings, Routes(hub, control, registry, idempotency, presence), metrics)
