"""The in-process presence store: one node, no Redis, the same answers.

Members leave when their session ends, and a node that dies takes its memory
with it, so entries need no expiry and ``refresh`` has nothing to do.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from wsbroker.presence.base import Member, PresenceStats, PresenceStore


class MemoryPresenceStore(PresenceStore):
    """Channel → client id → member, and a per-channel count of each user's members."""

    def __init__(self) -> None:
        self._members: dict[str, dict[str, Member]] = {}
        self._users: dict[str, Counter[str]] = {}

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self._members.clear()
        self._users.clear()

    async def add(self, channel: str, member: Member) -> None:
        members = self._members.setdefault(channel, {})
        if member.client not in members:
            self._users.setdefault(channel, Counter())[member.user] += 1
        members[member.client] = member

    async def remove(self, channel: str, member: Member) -> None:
        members = self._members.get(channel)
        if members is None or members.pop(member.client, None) is None:
            return
        users = self._users[channel]
        users[member.user] -= 1
        if users[member.user] <= 0:
            del users[member.user]
        if not members:
            del self._members[channel]
            del self._users[channel]

    async def refresh(self, held: Mapping[str, Sequence[Member]]) -> list[tuple[str, Member]]:
        return [(channel, member) for channel, members in held.items() for member in members
                if member.client not in self._members.get(channel, {})]

    async def members(self, channel: str) -> list[bytes]:
        return [member.json for member in self._members.get(channel, {}).values()]

    async def stats(self, channel: str) -> PresenceStats:
        return PresenceStats(len(self._members.get(channel, ())), len(self._users.get(channel, ())))
