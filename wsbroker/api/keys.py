"""API keys: any configured key is accepted, so keys can be rotated without downtime.

Rotation: start nodes with ``--api-key NEW,OLD``, move the backends to NEW,
then drop OLD. A key arrives as ``Authorization: Bearer <key>`` or
``X-API-Key: <key>``. The candidate is compared with every configured key, in
constant time and without stopping at a match, so the answer's timing tells
nothing about how much of a key was right, nor which key matched.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping


class ApiKeys:
    """The keys the API accepts."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple(key.encode() for key in keys)
        if not self._keys:
            raise ValueError("the HTTP API needs at least one key")

    def accepts(self, headers: Mapping[str, str]) -> bool:
        """True if the request's headers carry one of the keys."""
        candidate = presented_key(headers)
        if candidate is None:
            return False
        given = candidate.encode(errors="replace")
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(given, key)
        return matched


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request presents: ``Authorization: Bearer …`` first, else ``X-API-Key``."""
    authorization = headers.get("Authorization")
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    key = headers.get("X-API-Key")
    return key.strip() if key else None
