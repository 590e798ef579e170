"""The fleet registry: which nodes are alive, what they hold, which channels have subscribers.

The HTTP API answers ``info`` and ``channels`` for the whole fleet (SPEC §12)
from any node, so every node, API or not, reports itself here.

* **Memory engine** (one node): the answers are this node's own.
* **Redis / Redis Cluster**: each node writes its report every
  :attr:`RedisRegistry.interval` (5 s) to its own key, which expires after
  :attr:`RedisRegistry.ttl` (15 s): a node that dies without saying goodbye
  drops out within 15 s, and one that stops cleanly deletes its key at once.
  The keys share the hash tag ``{nodes}``, so on a cluster they live in one slot
  and one ``MGET`` reads them all; a set lists the node ids (pruned as keys expire).

``channels`` asks Redis itself rather than node reports: ``PUBSUB CHANNELS
<prefix>*`` (classic), ``PUBSUB SHARDCHANNELS <prefix>*`` on every master
(cluster). A node holds a Redis subscription exactly while it has a local
subscriber (SPEC §6), so Redis's own list is the fleet's answer, current to the
moment, with no report lag and no per-channel write traffic from the nodes.
It costs one O(channels) command per request, which suits an admin endpoint.
Names that are not valid channels (another application's, our control channel)
are left out.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from wsbroker import __version__
from wsbroker.backplane import BackplaneUnavailable
from wsbroker.backplane.link import CONNECT_TIMEOUT, PUBLISH_TIMEOUT, redact_url
from wsbroker.channels import is_valid_channel
from wsbroker.config import Settings
from wsbroker.redis_errors import REDIS_FAILURES
from wsbroker.tasks import cancel_and_wait

log = logging.getLogger("wsbroker.registry")

AnyRedis = Redis | RedisCluster


@dataclass(frozen=True, slots=True)
class NodeReport:
    """One node as ``/api/info`` shows it."""

    node: str
    connections: int
    subscriptions: int
    channels: int
    uptime_s: float
    version: str = __version__


Snapshot = Callable[[], NodeReport]
"""This node's report, now."""

LocalChannels = Callable[[], list[str]]
"""This node's channels with local subscribers, now."""


def open_redis(settings: Settings) -> AnyRedis:
    """A client for the node's own Redis commands (registry, idempotency), apart from the
    backplane's: 3 s timeouts and no redis-py retries, as the backplane's publishers."""
    assert settings.redis_url is not None
    options: dict[str, Any] = {
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": PUBLISH_TIMEOUT,
        "decode_responses": False,
    }
    if settings.redis_cluster:
        return RedisCluster.from_url(settings.redis_url, **options)
    return Redis.from_url(settings.redis_url, retry_on_timeout=False, **options)


class Registry(abc.ABC):
    """Reports this node to the fleet; answers for the fleet."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Begin reporting (never fails: a Redis that is down is retried)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop reporting and leave the fleet at once."""

    @abc.abstractmethod
    async def nodes(self) -> list[NodeReport]:
        """Every live node, sorted by id. Raises ``BackplaneUnavailable``."""

    @abc.abstractmethod
    async def channels(self) -> list[str]:
        """Channels with a subscriber on some node, sorted. Raises ``BackplaneUnavailable``."""


class MemoryRegistry(Registry):
    """The in-process engine's fleet is this node."""

    def __init__(self, snapshot: Snapshot, local_channels: LocalChannels) -> None:
        self._snapshot = snapshot
        self._local_channels = local_channels

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def nodes(self) -> list[NodeReport]:
        return [self._snapshot()]

    async def channels(self) -> list[str]:
        return sorted(self._local_channels())


class RedisRegistry(Registry):
    """Node reports in expiring Redis keys; channels from Redis's pub/sub introspection."""

    interval: float = 5.0
    """Seconds between two reports of this node."""

    ttl: float = 15.0
    """Seconds a report lives: a node that died drops out within this."""

    def __init__(self, client: AnyRedis, settings: Settings, snapshot: Snapshot) -> None:
        self._client = client
        self._cluster = isinstance(client, RedisCluster)
        self._node_id = settings.node_id
        self._url = redact_url(settings.redis_url or "")
        prefix = settings.redis_prefix
        self._prefix = prefix.encode()
        self._set_key = f"{prefix}{{nodes}}".encode()
        self._key_prefix = self._set_key + b":"
        self._channel_glob = _glob_escape(prefix).encode() + b"*"
        self._snapshot = snapshot
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._report_forever(), name="wsbroker-registry")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        await cancel_and_wait(task)
        with contextlib.suppress(*REDIS_FAILURES):
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                await self._client.srem(self._set_key, self._node_id)
                await self._client.delete(self._key_prefix + self._node_id.encode())

    async def _report_forever(self) -> None:
        while True:
            try:
                await self._report()
                if self._failing:
                    log.info("reporting this node to Redis at %s again", self._url)
                self._failing = False
            except Exception as exc:  # the reporter must outlive anything: it retries
                if not self._failing:
                    log.warning("cannot report this node to Redis at %s (%s); /api/info on "
                                "other nodes will miss it until Redis is back", self._url, exc,
                                exc_info=not isinstance(exc, REDIS_FAILURES))
                self._failing = True
            await asyncio.sleep(self.interval)

    async def _report(self) -> None:
        report = orjson.dumps(asdict(self._snapshot()))
        node = self._node_id.encode()
        async with asyncio.timeout(PUBLISH_TIMEOUT):
            await self._client.set(self._key_prefix + node, report, px=int(self.ttl * 1000))
            await self._client.sadd(self._set_key, node)

    async def nodes(self) -> list[NodeReport]:
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                ids = sorted(_bytes(node) for node in
                             await self._client.smembers(self._set_key))
                values = (await self._client.mget([self._key_prefix + node for node in ids])
                          if ids else [])
                gone = [node for node, value in zip(ids, values, strict=True) if value is None]
                if gone:
                    await self._client.srem(self._set_key, *gone)
        except REDIS_FAILURES as exc:
            raise BackplaneUnavailable(f"Redis did not answer: {exc}") from exc
        reports = {self._node_id: self._snapshot()}  # our own, fresher than Redis's copy
        for value in values:
            if value is not None:
                report = _parse_report(_bytes(value))
                if report is not None and report.node not in reports:
                    reports[report.node] = report
        return [reports[node] for node in sorted(reports)]

    async def channels(self) -> list[str]:
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                if self._cluster:
                    # Every master answers for its own shards; redis-py merges the lists.
                    names = await self._client.execute_command(
                        "PUBSUB SHARDCHANNELS", self._channel_glob,
                        target_nodes=RedisCluster.PRIMARIES)
                else:
                    names = await self._client.execute_command(
                        "PUBSUB CHANNELS", self._channel_glob)
        except REDIS_FAILURES as exc:
            raise BackplaneUnavailable(f"Redis did not answer: {exc}") from exc
        size = len(self._prefix)
        found = {name[size:].decode(errors="replace") for name in _flatten(names)}
        return sorted(name for name in found if is_valid_channel(name))


def _bytes(value: bytes | str) -> bytes:
    """redis-py's answers are bytes here (no decode_responses); its types say either."""
    return value if isinstance(value, bytes) else value.encode()


def _flatten(names: Any) -> list[bytes]:
    """PUBSUB's answer: a list, or (several cluster nodes) a dict of lists."""
    if isinstance(names, dict):
        return [name for part in names.values() for name in (part or [])]
    return list(names or [])


def _parse_report(value: bytes) -> NodeReport | None:
    try:
        fields = orjson.loads(value)
        return NodeReport(**fields)
    except (orjson.JSONDecodeError, TypeError):
        return None  # a report from an incompatible version: skip it, it expires


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis glob pattern."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


def create_registry(
    settings: Settings, client: AnyRedis | None, snapshot: Snapshot, local_channels: LocalChannels
) -> Registry:
    """A Redis registry when the node has a Redis client, else the node alone."""
    if client is None:
        return MemoryRegistry(snapshot, local_channels)
    return RedisRegistry(client, settings, snapshot)


def uptime_since(started: float) -> float:
    """Seconds since ``started`` (a ``time.monotonic()`` reading), to 0.1 s."""
    return round(time.monotonic() - started, 1)
