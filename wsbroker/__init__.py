"""wsbroker: a real-time WebSocket pub/sub server with a Redis backplane."""

from wsbroker.client import publish

__all__ = ["publish"]
__version__ = "0.1.0"
