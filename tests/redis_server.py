"""A real ``redis-server`` for tests: start, SIGKILL, restart on the same port.

Failure paths in the SPEC are driven for real (ARCHITECTURE: "a real
redis-server process, killed and restarted where the test needs it"), so this
helper owns one process on a free loopback port, with no persistence, and
waits until it answers PING instead of sleeping.

Use the ``redis_server`` fixture (one server per test; the test may kill it) or
``redis_server_module`` (shared by a module; do not kill it).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.helpers import free_port

START_TIMEOUT = 10.0


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1; restartable on the same port.

    Subclasses add flags with :meth:`extra_args` (the cluster nodes do).
    """

    def __init__(
        self,
        port: int | None = None,
        executable: str | None = None,
        directory: Path | None = None,
    ) -> None:
        self.executable = executable or find_executable("redis-server")
        self.port = port or free_port()
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="wsb-redis-")
        self.dir = directory or Path(self._tmp.name if self._tmp else ".")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def extra_args(self) -> list[str]:
        return []

    def start(self) -> None:
        """Start (or restart) on ``self.port`` and return once it answers PING."""
        if self.running:
            return
        log = self.dir / "redis.log"
        self._proc = subprocess.Popen(
            [
                self.executable,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.dir),
                "--logfile", str(log),
                "--protected-mode", "no",
                *self.extra_args(),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                logged = log.read_text(errors="replace") if log.exists() else ""
                self._proc = None
                raise RuntimeError(
                    f"redis-server exited at start on port {self.port}: {err}{logged[-2000:]}"
                )
            if self._answers_ping():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING")
            time.sleep(0.01)

    def _answers_ping(self) -> bool:
        try:
            with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5,
                             socket_connect_timeout=0.5) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        """SIGKILL: the server vanishes without a goodbye, as in a crash."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM and wait."""
        self._end(signal.SIGTERM)

    def _end(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def close(self) -> None:
        """Stop the server and remove its directory (when it made one)."""
        self.kill()
        if self._tmp is not None:
            self._tmp.cleanup()

    def client(self, **kwargs: Any) -> redis.Redis:
        """A synchronous client for assertions (``PUBSUB NUMSUB``, ``CLIENT LIST``…)."""
        kwargs.setdefault("socket_timeout", 5)
        kwargs.setdefault("socket_connect_timeout", 1)
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def command(self, *args: str | bytes | int) -> Any:
        """Run one command on this server and return the raw reply."""
        with self.client() as client:
            return client.execute_command(*args)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def find_executable(name: str) -> str:
    found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists()
                                   else None)
    if found is None:
        raise RuntimeError(
            f"{name} is not installed: the Redis tests need a real server "
            "(apt-get install redis-server; scripts/test does it)"
        )
    return found


def redis_cli(server: RedisServer, *args: str | bytes | int) -> Any:
    """Run one command on ``server`` synchronously and return the raw reply."""
    return server.command(*args)


def numsub(server: RedisServer, *channels: str) -> dict[str, int]:
    """``PUBSUB NUMSUB`` as a dict: Redis channel name → subscriber count."""
    with server.client() as client:
        reply = client.pubsub_numsub(*channels)
    return {
        (name.decode() if isinstance(name, bytes) else str(name)): int(count)
        for name, count in reply
    }


def start_redis_server() -> RedisServer:
    """A started server, or a clear test failure when redis-server is missing."""
    try:
        server = RedisServer()
        server.start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    return server


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A running server for one test, which may kill and restart it."""
    server = start_redis_server()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def redis_server_module() -> Iterator[RedisServer]:
    """A running server shared by a module's tests (do not kill it)."""
    server = start_redis_server()
    try:
        yield server
    finally:
        server.close()
