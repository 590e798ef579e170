"""The wire protocol, sans I/O: client frames in, server frames out (SPEC §4–5).

Parsing turns one text frame into a typed op or raises :class:`ProtocolError`
carrying the error code and the op's ``id`` (so the reply can echo it).
Encoding returns ready-to-send UTF-8 JSON bytes. Nothing here touches a socket,
a clock or a logger, so every rule is tested with plain unit tests.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from wsbroker.channels import is_valid_channel

OpId = int | str | None

HISTORY_DEFAULT_LIMIT = 50
HISTORY_MAX_LIMIT = 1000
ENVELOPE_MAGIC = b"wsb1"


class ProtocolError(Exception):
    """A client frame we refuse; ``code`` is the SPEC error code sent back."""

    def __init__(self, code: str, message: str, op_id: OpId = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.op_id = op_id


@dataclass(frozen=True, slots=True)
class Since:
    """Where a recovering subscriber left off (SPEC §7)."""

    offset: int
    epoch: str


@dataclass(frozen=True, slots=True)
class Auth:
    id: OpId
    token: str


@dataclass(frozen=True, slots=True)
class Subscribe:
    id: OpId
    channel: str
    since: Since | None = None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    id: OpId
    channel: str


@dataclass(frozen=True, slots=True)
class Publish:
    id: OpId
    channel: str
    data: bytes  # the JSON value, encoded once


@dataclass(frozen=True, slots=True)
class History:
    id: OpId
    channel: str
    limit: int = HISTORY_DEFAULT_LIMIT


@dataclass(frozen=True, slots=True)
class Ping:
    id: OpId


@dataclass(frozen=True, slots=True)
class Presence:
    id: OpId
    channel: str


@dataclass(frozen=True, slots=True)
class PresenceStats:
    id: OpId
    channel: str


Op = Auth | Subscribe | Unsubscribe | Publish | History | Ping | Presence | PresenceStats


def parse_op(frame: str | bytes) -> Op:
    """Parse one client text frame; raises :class:`ProtocolError` on anything invalid."""
    try:
        obj = orjson.loads(frame)
    except orjson.JSONDecodeError:
        raise ProtocolError("bad_request", "frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_request", "frame must be a JSON object")
    op_id = obj.get("id")
    if op_id is not None and (not isinstance(op_id, int | str) or isinstance(op_id, bool)):
        raise ProtocolError("bad_request", "id must be an integer or a string")
    name = obj.get("op")
    if not isinstance(name, str):  # never echo a non-string (it may be nested 1,000 deep)
        raise ProtocolError("bad_request", "'op' must be a string", op_id)
    parser = _PARSERS.get(name)
    if parser is None:
        raise ProtocolError("bad_request", f"unknown op {name[:100]!r}", op_id)
    return parser(obj, op_id)


def _string(obj: dict[str, Any], key: str, op_id: OpId) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise ProtocolError("bad_request", f"{key!r} must be a non-empty string", op_id)
    return value


def _channel(obj: dict[str, Any], op_id: OpId) -> str:
    value = obj.get("channel")
    if not isinstance(value, str):
        raise ProtocolError("bad_request", "'channel' must be a string", op_id)
    if not is_valid_channel(value):
        raise ProtocolError("invalid_channel", f"{value[:300]!r} is not a valid channel", op_id)
    return value


def _parse_auth(obj: dict[str, Any], op_id: OpId) -> Auth:
    return Auth(op_id, _string(obj, "token", op_id))


def _parse_subscribe(obj: dict[str, Any], op_id: OpId) -> Subscribe:
    channel = _channel(obj, op_id)
    since = obj.get("since")
    if since is None:
        return Subscribe(op_id, channel)
    if not isinstance(since, dict):
        raise ProtocolError("bad_request", "'since' must be an object", op_id)
    offset, epoch = since.get("offset"), since.get("epoch")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise ProtocolError("bad_request", "'since.offset' must be an integer ≥ 0", op_id)
    if not isinstance(epoch, str):
        raise ProtocolError("bad_request", "'since.epoch' must be a string", op_id)
    return Subscribe(op_id, channel, Since(offset, epoch))


def _parse_unsubscribe(obj: dict[str, Any], op_id: OpId) -> Unsubscribe:
    return Unsubscribe(op_id, _channel(obj, op_id))


def _parse_publish(obj: dict[str, Any], op_id: OpId) -> Publish:
    channel = _channel(obj, op_id)
    if "data" not in obj:
        raise ProtocolError("bad_request", "'data' is required", op_id)
    try:
        data = reencode(obj["data"])
    except ValueError as exc:
        raise ProtocolError("bad_request", f"'data' {exc}", op_id) from None
    return Publish(op_id, channel, data)


MAX_DEPTH_MESSAGE = "is nested too deeply (at most 255 levels)"


def reencode(value: Any) -> bytes:
    """``value`` as JSON bytes; ValueError if it is nested deeper than orjson writes.

    orjson reads up to 1,024 levels but writes only 255, so a document can be
    accepted by ``loads`` and still fail here: that is bad input, not a crash.
    """
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        raise ValueError(MAX_DEPTH_MESSAGE) from None


def _parse_history(obj: dict[str, Any], op_id: OpId) -> History:
    channel = _channel(obj, op_id)
    limit = obj.get("limit", HISTORY_DEFAULT_LIMIT)
    if (
        not isinstance(limit, int)
        or isinstance(limit, bool)
        or not 1 <= limit <= HISTORY_MAX_LIMIT
    ):
        raise ProtocolError(
            "bad_request", f"'limit' must be an integer from 1 to {HISTORY_MAX_LIMIT}", op_id
        )
    return History(op_id, channel, limit)


def _parse_ping(obj: dict[str, Any], op_id: OpId) -> Ping:
    return Ping(op_id)


def _parse_presence(obj: dict[str, Any], op_id: OpId) -> Presence:
    return Presence(op_id, _channel(obj, op_id))


def _parse_presence_stats(obj: dict[str, Any], op_id: OpId) -> PresenceStats:
    return PresenceStats(op_id, _channel(obj, op_id))


_PARSERS: dict[str, Callable[[dict[str, Any], OpId], Op]] = {
    "auth": _parse_auth,
    "subscribe": _parse_subscribe,
    "unsubscribe": _parse_unsubscribe,
    "publish": _parse_publish,
    "history": _parse_history,
    "ping": _parse_ping,
    "presence": _parse_presence,
    "presence_stats": _parse_presence_stats,
}


# -- server frames -------------------------------------------------------------


def encode_ok(op_id: OpId, **fields: Any) -> bytes:
    reply: dict[str, Any] = {"type": "ok"}
    if op_id is not None:
        reply["id"] = op_id
    reply.update(fields)
    return orjson.dumps(reply)


def encode_error(op_id: OpId, code: str, message: str) -> bytes:
    reply: dict[str, Any] = {"type": "error"}
    if op_id is not None:
        reply["id"] = op_id
    reply["code"] = code
    reply["message"] = message
    return orjson.dumps(reply)


def encode_welcome(
    client: str, user: str, node: str, expires: float, op_id: OpId = None
) -> bytes:
    frame: dict[str, Any] = {"type": "welcome"}
    if op_id is not None:
        frame["id"] = op_id
    frame.update(client=client, user=user, node=node, expires=expires)
    return orjson.dumps(frame)


def encode_unsubscribed(channel: str, reason: str) -> bytes:
    return orjson.dumps({"type": "unsubscribed", "channel": channel, "reason": reason})


def encode_message(
    channel: str, data: bytes, sender: str | None = None, offset: int | None = None
) -> bytes:
    """A message frame around ``data``, already-valid JSON bytes, spliced in as is."""
    frame: dict[str, Any] = {"type": "message", "channel": channel, "data": orjson.Fragment(data)}
    if sender is not None:
        frame["from"] = sender
    if offset is not None:
        frame["offset"] = offset
    return orjson.dumps(frame)


def encode_member_frame(kind: str, channel: str, member: bytes) -> bytes:
    """A ``join`` or ``leave`` frame around ``member``, already-valid JSON bytes (SPEC §11)."""
    return orjson.dumps({"type": kind, "channel": channel, "member": orjson.Fragment(member)})


# -- backplane payloads (SPEC §6) ------------------------------------------------

MEMBER_EVENTS = ("join", "leave")


@dataclass(frozen=True, slots=True)
class MemberEvent:
    """A join or leave travelling with the channel's messages, so it keeps their order."""

    kind: str
    member: bytes
    client: str
    """The member's connection, which never receives its own join or leave."""


class Envelope(NamedTuple):
    """A backplane payload, decoded: the JSON ``data`` and where it came from.

    A member event (``wsb1{"event":"join"|"leave","member":{…}}``) has ``event``
    set and no data. A tuple, not a frozen dataclass: one is decoded per
    message on the fan-out path, and it builds in a third of the time.
    """

    data: bytes
    sender: str | None = None
    offset: int | None = None
    epoch: str | None = None
    event: MemberEvent | None = None


def encode_member_event(kind: str, member: bytes) -> bytes:
    """``wsb1{"event":kind,"member":{…}}``: a join/leave published on the channel itself."""
    return ENVELOPE_MAGIC + orjson.dumps({"event": kind, "member": orjson.Fragment(member)})


def encode_envelope(
    data: bytes, sender: str | None = None, offset: int | None = None, epoch: str | None = None
) -> bytes:
    """``wsb1{…}``: the form nodes publish so that ``from`` travels with ``data``."""
    body: dict[str, Any] = {"data": orjson.Fragment(data)}
    if sender is not None:
        body["from"] = sender
    if offset is not None:
        body["offset"] = offset
    if epoch is not None:
        body["epoch"] = epoch
    return ENVELOPE_MAGIC + orjson.dumps(body)


def decode_payload(payload: bytes) -> Envelope:
    """Raw JSON or a ``wsb1`` envelope → :class:`Envelope`; ValueError if neither.

    Raw JSON is validated and kept byte for byte, so a backend's document
    reaches browsers exactly as published.
    """
    if payload.startswith(ENVELOPE_MAGIC):
        body = orjson.loads(payload[len(ENVELOPE_MAGIC) :])
        if isinstance(body, dict) and "event" in body:
            return Envelope(b"null", event=_member_event(body))
        if not isinstance(body, dict) or "data" not in body:
            raise ValueError("envelope must be an object with 'data'")
        sender, offset, epoch = body.get("from"), body.get("offset"), body.get("epoch")
        if sender is not None and not isinstance(sender, str):
            raise ValueError("envelope 'from' must be a string")
        if offset is not None and (not isinstance(offset, int) or isinstance(offset, bool)):
            raise ValueError("envelope 'offset' must be an integer")
        if epoch is not None and not isinstance(epoch, str):
            raise ValueError("envelope 'epoch' must be a string")
        return Envelope(reencode(body["data"]), sender, offset, epoch)
    orjson.loads(payload)  # validation only: raises orjson.JSONDecodeError (a ValueError)
    return Envelope(payload)


def _member_event(body: dict[str, Any]) -> MemberEvent:
    kind, member = body["event"], body.get("member")
    if kind not in MEMBER_EVENTS:
        raise ValueError(f"envelope 'event' must be one of {', '.join(MEMBER_EVENTS)}")
    if not isinstance(member, dict) or not isinstance(member.get("client"), str):
        raise ValueError("envelope 'member' must be an object with a string 'client'")
    return MemberEvent(kind, orjson.dumps(member), member["client"])


def text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented WebSocket text frame (RFC 6455 §5.2).

    Server frames are never masked, so the same bytes can be written to every
    subscriber's transport: the frame is built once per message, not per client.
    """
    return text_frame_header(len(payload)) + payload


def text_frame_header(length: int) -> bytes:
    """The header of a text frame whose payload is ``length`` bytes."""
    if length < 126:
        return _SHORT_TEXT_HEADERS[length]
    if length < 65536:
        return _pack_medium_header(0x81, 126, length)
    return bytes((0x81, 127)) + length.to_bytes(8, "big")


_SHORT_TEXT_HEADERS = [bytes((0x81, length)) for length in range(126)]
_pack_medium_header = struct.Struct("!BBH").pack


def message_prefix(channel: str) -> bytes:
    """What a plain message frame on ``channel`` starts with, up to its ``data``.

    ``prefix + data + b"}"`` is byte for byte what :func:`encode_message` makes
    of a message with no ``from`` and no ``offset``: a channel's prefix is
    built once, and a backend's raw JSON is framed with one join.
    """
    return b'{"type":"message","channel":' + orjson.dumps(channel) + b',"data":'
