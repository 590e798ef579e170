"""Publishes made in one loop turn share one pipeline; each caller keeps its own reply."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from tests.redis_server import RedisServer
from wsbroker.backplane.pipelining import Pipeliner


class CountingRedis(Redis):  # type: ignore[type-arg]
    """A real client that counts the pipelines it sends."""

    pipelines = 0

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        CountingRedis.pipelines += 1
        return super().pipeline(*args, **kwargs)


async def test_a_burst_is_one_pipeline_and_every_caller_is_answered(
    redis_server: RedisServer,
) -> None:
    client = CountingRedis.from_url(redis_server.url)
    CountingRedis.pipelines = 0
    pipeliner = Pipeliner(client, "RPUSH", max_batch=100)
    try:
        async with asyncio.timeout(10):
            await asyncio.gather(*(pipeliner.send(b"list", b"%d" % i) for i in range(250)))
        assert CountingRedis.pipelines == 3  # 100 + 100 + 50
        # Each caller's item is in, once. The three pipelines run on their own
        # connections and may interleave (concurrent callers have no order to keep);
        # within one pipeline the order holds.
        pushed = await client.lrange("list", 0, -1)
        assert sorted(pushed) == sorted(b"%d" % i for i in range(250))
        where = {item: index for index, item in enumerate(pushed)}
        for first in (0, 100, 200):
            positions = [where[b"%d" % i] for i in range(first, min(first + 100, 250))]
            assert positions == sorted(positions)
    finally:
        await pipeliner.close()
        await client.aclose()


async def test_an_error_reaches_only_its_own_caller(redis_server: RedisServer) -> None:
    client = Redis.from_url(redis_server.url)
    await client.set("not-a-list", "x")
    pipeliner = Pipeliner(client, "RPUSH")
    try:
        async with asyncio.timeout(10):
            results = await asyncio.gather(
                pipeliner.send(b"list", b"1"), pipeliner.send(b"not-a-list", b"2"),
                pipeliner.send(b"list", b"3"), return_exceptions=True)
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], ResponseError) and "WRONGTYPE" in str(results[1])
    finally:
        await pipeliner.close()
        await client.aclose()


async def test_redis_gone_fails_every_caller(redis_server: RedisServer) -> None:
    client = Redis.from_url(redis_server.url, socket_connect_timeout=1)
    pipeliner = Pipeliner(client, "PUBLISH")
    redis_server.kill()
    try:
        async with asyncio.timeout(10):
            results = await asyncio.gather(*(pipeliner.send(b"c", b"1") for _ in range(3)),
                                           return_exceptions=True)
        assert all(isinstance(result, Exception) for result in results)
    finally:
        await pipeliner.close()
        await client.aclose()


@pytest.mark.parametrize("cancel_first", [True, False])
async def test_a_caller_that_gives_up_leaves_the_others_answered(
    redis_server: RedisServer, cancel_first: bool,
) -> None:
    client = Redis.from_url(redis_server.url)
    pipeliner = Pipeliner(client, "RPUSH")
    try:
        calls = [asyncio.ensure_future(pipeliner.send(b"l", b"%d" % i)) for i in range(2)]
        await asyncio.sleep(0)
        calls[0 if cancel_first else 1].cancel()
        async with asyncio.timeout(10):
            await asyncio.gather(*calls, return_exceptions=True)
        survivor = calls[1 if cancel_first else 0]
        assert survivor.result() is None
    finally:
        await pipeliner.close()
        await client.aclose()
