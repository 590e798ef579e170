"""A real loopback HTTP receiver for webhook tests (aiohttp's server).

Each request is recorded with its headers, raw body and arrival time; how the
receiver answers is scripted per request (status, headers, or hang until the
test ends), so retries and timeouts are driven for real.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.helpers import WAIT


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic()
    wall: float  # time.time()
    path: str

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def events(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = orjson.loads(self.body)["events"]
        return events


class Receiver:
    """Answers 200 unless told otherwise: ``script`` replies are used first, in order."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.script: list[Reply] = []
        self.default = Reply()
        self._queue: asyncio.Queue[Received] = asyncio.Queue()
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hooks", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        received = Received({k.lower(): v for k, v in request.headers.items()},
                            await request.read(), time.monotonic(), time.time(),
                            request.path_qs)
        self.requests.append(received)
        self._queue.put_nowait(received)
        for event in received.events:
            self._events.put_nowait(event)
        reply = self.script.pop(0) if self.script else self.default
        if reply.hang:
            await self._release.wait()
        return web.Response(status=reply.status, headers=reply.headers)

    async def next_request(self, timeout: float = WAIT) -> Received:
        return await asyncio.wait_for(self._queue.get(), timeout)

    async def next_events(self, count: int, timeout: float = WAIT) -> list[dict[str, Any]]:
        """The next ``count`` events, whatever requests carried them."""
        async with asyncio.timeout(timeout):
            return [await self._events.get() for _ in range(count)]

    async def next_event(self, timeout: float = WAIT) -> dict[str, Any]:
        return (await self.next_events(1, timeout))[0]

    def no_events_yet(self) -> bool:
        return self._events.empty()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = await Receiver().start()
    yield server
    await server.stop()
