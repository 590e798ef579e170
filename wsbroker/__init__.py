"""wsbroker: a real-time WebSocket pub/sub server with a Redis backplane."""

from __future__ import annotations

from typing import Any

__all__ = ["publish"]
__version__ = "0.3.0"


def __getattr__(name: str) -> Any:
    # Imported on first use: the commands that never publish (token, serve)
    # should not pay for importing the Redis client.
    if name == "publish":
        from wsbroker.client import publish

        return publish
    raise AttributeError(f"module 'wsbroker' has no attribute {name!r}")
