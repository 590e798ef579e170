"""Presence: who is in a channel, across the fleet (SPEC §11).

A capability beside the backplane, as centrifuge's ``PresenceManager`` sits
beside its ``Broker``: one store interface (:mod:`.base`), a memory and a Redis
store (the Redis one serves Redis Cluster too), and the node's
:class:`PresenceService`, which sessions and the HTTP API use.
"""

from __future__ import annotations

from wsbroker.presence.base import Member, PresenceNotEnabled, PresenceStats, PresenceStore
from wsbroker.presence.service import PresenceService, create_presence_store

__all__ = [
    "Member",
    "PresenceNotEnabled",
    "PresenceService",
    "PresenceStats",
    "PresenceStore",
    "create_presence_store",
]
