"""Small clients behind ``wsbroker publish`` and ``wsbroker listen``.

They are also the library API for Python backends: :func:`publish` writes one
message to the Redis backplane exactly as any other backend would; on a channel
matching a history rule it records it with one ``FCALL`` of the ``wsbroker``
Function library, as the nodes do.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
import redis.asyncio as redis
from redis.exceptions import RedisError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from wsbroker.backplane.link import redact_url
from wsbroker.history import HistoryRule, HistoryRules, Published, call_function


class ClientError(Exception):
    """The command could not do its job; the message says why, for a human."""


async def publish(
    redis_url: str, channel: str, data: object, prefix: str = "ws:", *, cluster: bool = False,
    history: Iterable[str] | HistoryRules = (),
) -> Published:
    """Publish ``data`` (any JSON value) to ``channel`` through Redis.

    ``cluster=True`` uses SPUBLISH on a Redis Cluster. ``history`` takes the
    nodes' ``--history`` rules (``PATTERN=SIZE[:TTL]``): on a matching channel
    the message is recorded and the result carries its ``offset`` and ``epoch``.
    """
    rules = history if isinstance(history, HistoryRules) else HistoryRules.parse(history)
    return await publish_redis(redis_url, prefix, channel, orjson.dumps(data), cluster=cluster,
                               rule=rules.rule_for(channel))


async def publish_redis(
    redis_url: str, prefix: str, channel: str, data: bytes, *, cluster: bool = False,
    rule: HistoryRule | None = None,
) -> Published:
    options: dict[str, Any] = {"socket_connect_timeout": 5, "socket_timeout": 5}
    client = (redis.RedisCluster if cluster else redis.Redis).from_url(redis_url, **options)
    key = (prefix + channel).encode()
    try:
        if rule is not None:
            function = "wsb_spublish" if cluster else "wsb_publish"
            reply = await call_function(client, function, key,  # type: ignore[arg-type]
                                        data, rule.size, rule.ttl)
            return Published(int(reply[0]), reply[1].decode())
        if isinstance(client, redis.RedisCluster):
            await client.spublish(key, data)
        else:
            await client.publish(key, data)
    except RedisError as exc:
        raise ClientError(f"cannot reach Redis at {redact_url(redis_url)}: {exc}"
                          ) from None
    finally:
        await client.aclose()
    return Published()


async def publish_websocket(url: str, token: str, channel: str, data: bytes) -> Published:
    """Publish through a node as a client (needs a token with a ``publish`` claim)."""
    async with _connect(url, token) as connection:
        frame = b'{"op":"publish","id":1,"channel":' + orjson.dumps(channel)
        await connection.send(frame + b',"data":' + data + b"}", text=True)
        reply = await _expect_ok(connection, 1)
    offset = reply.get("offset")
    return Published(offset if isinstance(offset, int) else None)


async def listen(url: str, token: str, channels: Sequence[str], count: int | None) -> None:
    """Subscribe and print one JSON line per message until closed (or ``count`` seen)."""
    async with _connect(url, token) as connection:
        for index, channel in enumerate(channels, start=1):
            await connection.send(orjson.dumps({"op": "subscribe", "id": index,
                                                "channel": channel}).decode())
            await _expect_ok(connection, index)
        seen = 0
        while count is None or seen < count:
            try:
                frame = orjson.loads(await connection.recv())
            except ConnectionClosed as exc:
                raise ClientError(f"connection closed by the server: {_closed(exc)}") from None
            if frame.get("type") in ("message", "unsubscribed"):
                sys.stdout.write(orjson.dumps(frame).decode() + "\n")
                sys.stdout.flush()
                seen += frame.get("type") == "message"


class _connect:
    """``connect()`` with the token in the Authorization header and human errors."""

    def __init__(self, url: str, token: str) -> None:
        self._url, self._token = url, token
        self._connection: ClientConnection | None = None

    async def __aenter__(self) -> ClientConnection:
        try:
            self._connection = await connect(
                self._url,
                additional_headers={"Authorization": f"Bearer {self._token}"},
                open_timeout=10,
                compression=None,
            )
            welcome = orjson.loads(await self._connection.recv())
        except InvalidURI:
            raise ClientError(f"{self._url!r} is not a ws:// or wss:// URL") from None
        except InvalidStatus as exc:
            reason = exc.response.body.decode(errors="replace").strip()
            raise ClientError(
                f"refused by {self._url}: HTTP {exc.response.status_code}: {reason}"
            ) from None
        except InvalidHandshake as exc:
            raise ClientError(f"{self._url} did not answer as a WebSocket server: {exc}") from None
        except ConnectionClosed as exc:
            raise ClientError(f"connection closed by the server: {_closed(exc)}") from None
        except (OSError, TimeoutError) as exc:
            raise ClientError(f"cannot connect to {self._url}: {exc}") from None
        if welcome.get("type") != "welcome":
            raise ClientError(f"unexpected first frame from the server: {welcome}")
        return self._connection

    async def __aexit__(self, *exc_info: object) -> None:
        if self._connection is not None:
            await self._connection.close()


async def _expect_ok(connection: ClientConnection, op_id: int) -> dict[str, Any]:
    while True:
        try:
            reply = orjson.loads(await connection.recv())
        except ConnectionClosed as exc:
            raise ClientError(f"connection closed by the server: {_closed(exc)}") from None
        if reply.get("id") != op_id:
            continue
        if reply.get("type") == "error":
            raise ClientError(f"{reply.get('code')}: {reply.get('message')}")
        return reply  # type: ignore[no-any-return]


def _closed(exc: ConnectionClosed) -> str:
    if exc.rcvd is None:
        return "no close frame"
    return f"code {exc.rcvd.code} {exc.rcvd.reason}".strip()
