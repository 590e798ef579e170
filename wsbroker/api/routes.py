"""The endpoints of SPEC §12: validate the request, call a node service, answer JSON.

Each endpoint is a client of the same node services a WebSocket session uses
(the hub publishes, the control channel disconnects, the registry answers for
the fleet), never a path around them. Handlers take the decoded JSON body
(POST) or the query (GET) and return the encoded answer; the server does HTTP.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from wsbroker.api.errors import ApiError, bad_request, invalid_channel, unavailable
from wsbroker.api.idempotency import Idempotency
from wsbroker.backplane import BackplaneUnavailable
from wsbroker.channels import InvalidPattern, Pattern, is_valid_channel
from wsbroker.control import Control
from wsbroker.history import HistoryNotEnabled, Published
from wsbroker.hub import Hub
from wsbroker.presence import PresenceNotEnabled, PresenceService
from wsbroker.protocol import HISTORY_DEFAULT_LIMIT, HISTORY_MAX_LIMIT
from wsbroker.registry import Registry

MAX_BROADCAST_CHANNELS = 1000
MAX_IDEMPOTENCY_KEY = 256

Handler = Callable[[Any], Awaitable[bytes]]
"""POST: the JSON body → the answer; GET: the query (a str → str mapping) → the answer."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One path: its method, and its handler."""

    path: str
    method: str
    handle: Handler


class Routes:
    """The API's endpoints over one node's services."""

    def __init__(self, hub: Hub, control: Control, registry: Registry,
                 idempotency: Idempotency, presence: PresenceService) -> None:
        self._hub = hub
        self._control = control
        self._registry = registry
        self._idempotency = idempotency
        self._presence = presence

    def endpoints(self) -> list[Endpoint]:
        return [
            Endpoint("/api/publish", "POST", self.publish),
            Endpoint("/api/broadcast", "POST", self.broadcast),
            Endpoint("/api/disconnect", "POST", self.disconnect),
            Endpoint("/api/history", "GET", self.history),
            Endpoint("/api/presence", "GET", self.presence),
            Endpoint("/api/presence_stats", "GET", self.presence_stats),
            Endpoint("/api/channels", "GET", self.channels),
            Endpoint("/api/info", "GET", self.info),
        ]

    async def publish(self, body: Any) -> bytes:
        """A backend publish: no ``from``; once per ``idempotency_key`` within 5 minutes."""
        request = _object(body)
        channel = _channel(request.get("channel"))
        data = _data(request)
        key = request.get("idempotency_key")
        if key is None:
            result = await self._hub.publish(channel, data)
        elif isinstance(key, str) and 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
            result = await self._idempotency.once(
                channel, key, lambda: self._hub.publish(channel, data))
        else:
            raise bad_request(f"'idempotency_key' must be a string of 1 to "
                              f"{MAX_IDEMPOTENCY_KEY} characters")
        return orjson.dumps(_published(channel, result))

    async def broadcast(self, body: Any) -> bytes:
        """One message to many channels; one result per channel, in the request's order."""
        request = _object(body)
        channels = request.get("channels")
        if (not isinstance(channels, list)
                or not 1 <= len(channels) <= MAX_BROADCAST_CHANNELS
                or not all(isinstance(channel, str) for channel in channels)):
            raise bad_request(f"'channels' must be a list of 1 to {MAX_BROADCAST_CHANNELS} "
                              "strings")
        data = _data(request)
        results: list[dict[str, Any]] = []
        for channel in channels:
            if not is_valid_channel(channel):
                results.append(_item_error(channel, invalid_channel(channel)))
                continue
            try:
                result = await self._hub.publish(channel, data)
            except BackplaneUnavailable:
                results.append(_item_error(channel, unavailable()))
                continue
            results.append(_published(channel, result))
        return orjson.dumps({"results": results})

    async def disconnect(self, body: Any) -> bytes:
        """Close every connection of a user, on every node, with 4003."""
        request = _object(body)
        user = request.get("user")
        if not isinstance(user, str) or not user:
            raise bad_request("'user' must be a non-empty string")
        await self._control.disconnect(user)
        return orjson.dumps({"user": user})

    async def history(self, query: Mapping[str, str]) -> bytes:
        """The newest ``limit`` messages of a history channel, oldest first, as the op."""
        channel = _channel(query.get("channel"))
        text = query.get("limit", str(HISTORY_DEFAULT_LIMIT))
        limit = int(text) if text.isdigit() and len(text) < 6 else 0
        if not 1 <= limit <= HISTORY_MAX_LIMIT:
            raise bad_request(f"'limit' must be an integer from 1 to {HISTORY_MAX_LIMIT}")
        try:
            page = await self._hub.history(channel, limit)
        except HistoryNotEnabled as exc:
            raise ApiError(400, "not_enabled", str(exc)) from None
        return orjson.dumps({"channel": channel,
                             "messages": [orjson.Fragment(m) for m in page.messages],
                             "offset": page.offset, "epoch": page.epoch})

    async def presence(self, query: Mapping[str, str]) -> bytes:
        """Every member of a ``--presence`` channel on every node, as the op answers."""
        channel = _channel(query.get("channel"))
        try:
            members = await self._presence.members_json(channel)
        except PresenceNotEnabled as exc:
            raise ApiError(400, "not_enabled", str(exc)) from None
        return orjson.dumps({"channel": channel,
                             "members": [orjson.Fragment(member) for member in members]})

    async def presence_stats(self, query: Mapping[str, str]) -> bytes:
        """Clients and distinct users of a ``--presence`` channel."""
        channel = _channel(query.get("channel"))
        try:
            stats = await self._presence.stats(channel)
        except PresenceNotEnabled as exc:
            raise ApiError(400, "not_enabled", str(exc)) from None
        return orjson.dumps({"channel": channel, "clients": stats.clients,
                             "users": stats.users})

    async def channels(self, query: Mapping[str, str]) -> bytes:
        """Channels with a subscriber on some node, optionally filtered by a pattern."""
        names = await self._registry.channels()
        text = query.get("pattern")
        if text is not None:
            try:
                pattern = Pattern.parse(text)
            except InvalidPattern:
                raise ApiError(400, "invalid_channel",
                               f"{text[:300]!r} is not a channel pattern") from None
            names = [name for name in names if pattern.matches(name)]
        return orjson.dumps({"channels": names})

    async def info(self, query: Mapping[str, str]) -> bytes:
        """Every live node of the fleet, as it last reported itself."""
        nodes = await self._registry.nodes()
        return orjson.dumps({"nodes": [asdict(node) for node in nodes]})


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    return body


def _channel(value: Any) -> str:
    if not isinstance(value, str):
        raise bad_request("'channel' must be a string")
    if not is_valid_channel(value):
        raise invalid_channel(value)
    return value


def _data(request: dict[str, Any]) -> bytes:
    if "data" not in request:
        raise bad_request("'data' is required (any JSON value, null included)")
    return orjson.dumps(request["data"])


def _published(channel: str, result: Published) -> dict[str, Any]:
    answer: dict[str, Any] = {"channel": channel}
    if result.offset is not None:
        answer["offset"] = result.offset
        answer["epoch"] = result.epoch
    return answer


def _item_error(channel: str, error: ApiError) -> dict[str, Any]:
    return {"channel": channel, "error": {"code": error.code, "message": error.message}}
