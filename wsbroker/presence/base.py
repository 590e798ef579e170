"""The contract every presence store honours (memory, Redis, Redis Cluster).

A store keeps, per channel, the fleet-wide set of members: one entry per
subscription of one connection, keyed by the connection's client id. The node
(:mod:`wsbroker.presence.service`) relies on these promises:

* ``add`` returns only once the member is in the answers of ``members`` and
  ``stats`` on every node; adding a client already present replaces its entry
  (a refreshed token with new ``info``) and still counts it once;
* ``remove`` never raises: an entry it cannot delete now (Redis down) expires
  by itself within the store's TTL;
* ``refresh`` (many channels at once) extends the expiry of this node's entries
  and returns those the store no longer has (a Redis restarted empty, a node cut
  off for longer than the TTL); the node adds back the ones still subscribed,
  so a living node's members are never missing for longer than one refresh
  period;
* an entry whose node stopped refreshing it disappears within the TTL;
* while the store cannot be reached, ``add``, ``refresh``, ``members`` and
  ``stats`` raise :class:`~wsbroker.backplane.BackplaneUnavailable`.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson


class PresenceNotEnabled(Exception):
    """The channel matches no ``--presence`` pattern; the client sees ``not_enabled``."""


@dataclass(frozen=True, slots=True)
class Member:
    """One subscription of one connection, as every node shows it.

    ``json`` is the member object ``{"client","user","info"?}`` encoded once,
    compact, so stores and frames splice the same bytes in without re-encoding.
    """

    client: str
    user: str
    json: bytes

    @classmethod
    def of(cls, client: str, user: str, info: Mapping[str, Any] | None = None) -> Member:
        body: dict[str, Any] = {"client": client, "user": user}
        if info is not None:
            body["info"] = info
        return cls(client, user, orjson.dumps(body))


@dataclass(frozen=True, slots=True)
class PresenceStats:
    """How many connections (``clients``) and distinct users (``users``) a channel has."""

    clients: int
    users: int


class PresenceStore(abc.ABC):
    """Where a channel's members live: this process, or Redis for the whole fleet."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Prepare; connections may be opened lazily, on first use."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Release connections. Entries left behind expire by themselves."""

    @abc.abstractmethod
    async def add(self, channel: str, member: Member) -> None:
        """Insert or replace ``member``; visible on every node once this returns."""

    @abc.abstractmethod
    async def remove(self, channel: str, member: Member) -> None:
        """Delete ``member``'s entry. Never raises."""

    @abc.abstractmethod
    async def refresh(self, held: Mapping[str, Sequence[Member]]) -> list[tuple[str, Member]]:
        """Extend the expiry of ``held`` (channel → members), in as few round trips as
        it can; return the (channel, member) pairs the store no longer has."""

    @abc.abstractmethod
    async def members(self, channel: str) -> list[bytes]:
        """Every live member of ``channel`` on every node, each as its JSON bytes."""

    @abc.abstractmethod
    async def stats(self, channel: str) -> PresenceStats:
        """The number of live members and of distinct users among them."""
