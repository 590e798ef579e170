"""A small HTTP API client for tests: real aiohttp requests, raw sockets for bad input."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from tests.helpers import WAIT
from wsbroker.server import Node

KEY = "test-api-key-0123456789abcdef"
OLD_KEY = "old-api-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


def api_url(node: Node) -> str:
    assert node.api is not None, "the node runs no API"
    return f"http://127.0.0.1:{node.api.port}"


class Api:
    """Calls one node's API; answers are (status, decoded JSON body)."""

    def __init__(self, session: aiohttp.ClientSession, node: Node) -> None:
        self.session = session
        self.url = api_url(node)

    async def call(self, method: str, path: str, body: Any = None, *,
                   headers: dict[str, str] | None = None, raw: bytes | None = None,
                   content_type: str = "application/json") -> tuple[int, Any]:
        sent = dict(AUTH if headers is None else headers)
        data = raw
        if data is None and body is not None:
            data = orjson.dumps(body)
        if data is not None:
            sent.setdefault("Content-Type", content_type)
        async with self.session.request(method, self.url + path, data=data,
                                        headers=sent) as response:
            payload = await response.read()
            assert response.content_type == "application/json", payload
            return response.status, orjson.loads(payload)

    async def post(self, path: str, body: Any, **kwargs: Any) -> tuple[int, Any]:
        return await self.call("POST", path, body, **kwargs)

    async def get(self, path: str, **kwargs: Any) -> tuple[int, Any]:
        return await self.call("GET", path, **kwargs)


@contextlib.asynccontextmanager
async def api(node: Node) -> AsyncIterator[Api]:
    timeout = aiohttp.ClientTimeout(total=WAIT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield Api(session, node)


async def raw_request(node: Node, head: bytes, body: bytes = b"") -> tuple[
        asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a raw connection to the API and write ``head`` (and ``body``) as given."""
    assert node.api is not None
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", node.api.port), WAIT)
    writer.write(head + body)
    await writer.drain()
    return reader, writer


async def read_until_closed(reader: asyncio.StreamReader, timeout: float = WAIT) -> bytes:
    """Everything the server sends until it closes the connection (bounded wait)."""
    chunks = []
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def post_head(path: str, length: int | None, *, key: str = KEY,
              extra: str = "") -> bytes:
    framing = f"Content-Length: {length}\r\n" if length is not None else (
        "Transfer-Encoding: chunked\r\n")
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\n{framing}{extra}\r\n").encode()
