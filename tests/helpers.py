"""Test helpers: tokens, a protocol-aware WebSocket client, a real server process.

Every wait is bounded: a test that would hang fails with a timeout instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import jwt
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

SECRET = "test-secret-with-enough-entropy-0123456789"
WAIT = 5.0  # the longest any single expected event may take


def make_token(
    sub: str | None = "alice",
    *,
    channels: Sequence[str] | None = (">",),
    publish: Sequence[str] | None = None,
    ttl: float = 3600,
    secret: str = SECRET,
    algorithm: str = "HS256",
    key: Any = None,
    headers: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    """A signed token; pass ``None`` to leave a claim out."""
    payload: dict[str, Any] = {"exp": int(time.time() + ttl), **claims}
    if sub is not None:
        payload["sub"] = sub
    if channels is not None:
        payload["channels"] = list(channels)
    if publish is not None:
        payload["publish"] = list(publish)
    return jwt.encode(payload, key if key is not None else secret, algorithm=algorithm,
                      headers=headers)


class Client:
    """A WebSocket client that speaks wsbroker's protocol, for tests."""

    def __init__(self, connection: ClientConnection) -> None:
        self.ws = connection
        self.welcome: dict[str, Any] | None = None
        self._next_id = 0
        self._backlog: list[dict[str, Any]] = []

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        url: str,
        token: str | None = None,
        *,
        how: str = "query",
        expect_welcome: bool = True,
        **kwargs: Any,
    ) -> AsyncIterator[Client]:
        """Connect and authenticate ``how``: "query", "header", "message" or "none"."""
        headers = dict(kwargs.pop("additional_headers", {}) or {})
        if token is not None and how == "query":
            url = f"{url}?token={token}"
        elif token is not None and how == "header":
            headers["Authorization"] = f"Bearer {token}"
        connection = await asyncio.wait_for(
            connect(url, additional_headers=headers, compression=kwargs.pop("compression", None),
                    open_timeout=WAIT, **kwargs),
            WAIT,
        )
        client = cls(connection)
        try:
            if token is not None and how == "message":
                await client.send({"op": "auth", "token": token})
            if expect_welcome and how != "none":
                client.welcome = await client.receive()
                assert client.welcome["type"] == "welcome", client.welcome
            yield client
        finally:
            await connection.close()

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send(frame if isinstance(frame, str) else orjson.dumps(frame).decode())

    async def receive(self, timeout: float = WAIT) -> dict[str, Any]:
        """The next frame, including any kept aside while waiting for a reply."""
        if self._backlog:
            return self._backlog.pop(0)
        frame = await asyncio.wait_for(self.ws.recv(), timeout)
        result: dict[str, Any] = orjson.loads(frame)
        return result

    async def request(self, op: str, timeout: float = WAIT, **fields: Any) -> dict[str, Any]:
        """Send an op with a fresh id and return its reply; other frames are kept."""
        self._next_id += 1
        op_id = self._next_id
        await self.send({"op": op, "id": op_id, **fields})
        async with asyncio.timeout(timeout):
            while True:
                frame: dict[str, Any] = orjson.loads(await self.ws.recv())
                if frame.get("id") == op_id and frame["type"] in ("ok", "error"):
                    return frame
                self._backlog.append(frame)

    async def subscribe(self, channel: str) -> dict[str, Any]:
        reply = await self.request("subscribe", channel=channel)
        assert reply["type"] == "ok", reply
        return reply

    async def next_message(self, timeout: float = WAIT) -> dict[str, Any]:
        """The next ``message`` frame (other frames are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.receive()
                if frame["type"] == "message":
                    return frame

    async def closed(self, timeout: float = WAIT) -> tuple[int | None, str]:
        """Wait for the server to close; returns (code, reason) it sent."""
        async with asyncio.timeout(timeout):
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await self.ws.recv()
        await asyncio.wait_for(self.ws.wait_closed(), timeout)
        rcvd = self.ws.protocol.close_rcvd
        return (rcvd.code, rcvd.reason) if rcvd else (None, "")


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], timeout: float = WAIT, every: float = 0.02
) -> None:
    """Poll ``condition`` until true, failing after ``timeout``.

    Only for state that no event exposes to a test (an HTTP probe, Redis's
    own bookkeeping, another process's cleanup).
    """
    async with asyncio.timeout(timeout):
        while True:
            result = condition()
            if isinstance(result, Awaitable):
                result = await result
            if result:
                return
            await asyncio.sleep(every)


async def http_status(url: str) -> int:
    """The status of a GET, off the event loop."""
    return (await asyncio.to_thread(http_get, url))[0]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any WSB_* variable, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("WSB_")}
    return {**env, **(extra or {})}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, errors included."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


class ServerProcess:
    """A real ``wsbroker serve`` process on a free port, its output captured to files."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, tmp: Path,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.args = ["serve", "--port", str(self.port), *args]
        self.stdout_path = tmp / f"server-{self.port}.out"
        self.stderr_path = tmp / f"server-{self.port}.err"
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True) -> ServerProcess:
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "wsbroker", *self.args],
                stdout=out, stderr=err, env=self.env,
            )
        if wait_ready:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"server exited early ({self.process.returncode}):\n"
                                     f"{self.stderr}")
            with contextlib.suppress(OSError):
                if http_get(self.http + "/healthz")[0] == 200:
                    return
            time.sleep(0.05)
        raise AssertionError(f"server not healthy within {timeout}s:\n{self.stderr}")

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
