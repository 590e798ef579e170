"""``--workers N``: SO_REUSEPORT processes behind one port (SPEC §10, issue 3),
and the ``publish`` / ``listen`` commands against a Redis-backed fleet."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis.asyncio as aioredis

from tests.helpers import SECRET, Client, ServerProcess, clean_env, eventually, http_get, make_token
from tests.redis_server import RedisServer

CLIENTS = 24


def nodes_of(clients: list[Client]) -> set[str]:
    return {client.welcome["node"] for client in clients if client.welcome}


def gauge(metrics: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", metrics, re.M)
    assert match is not None, name
    return float(match[1])


async def test_two_workers_share_the_port_and_the_channel_space(
    redis_server: RedisServer, server_process: Callable[..., ServerProcess]
) -> None:
    server = server_process("--workers", "2", "--redis-url", redis_server.url,
                            "--jwt-secret", SECRET, "--node-id", "wk", "--drain-seconds", "1")
    async with contextlib.AsyncExitStack() as stack:
        # /healthz answered means one worker listens; the other may still be
        # starting, so connect until both have taken clients (bounded).
        clients: list[Client] = []
        async with asyncio.timeout(15):
            while len(clients) < CLIENTS or len(nodes_of(clients)) < 2:
                clients.append(await stack.enter_async_context(
                    Client.connect(server.url, make_token())))
        assert nodes_of(clients) == {"wk-1", "wk-2"}, "connections land on both workers"
        for client in clients:
            await client.subscribe("fleet.news")
        async with aioredis.Redis.from_url(redis_server.url) as backend:
            assert await backend.publish("ws:fleet.news", b'{"headline": "both"}') == 2
        for client in clients:
            assert (await client.next_message())["data"] == {"headline": "both"}

        # Whichever worker answers the scrape, it reports the sum over both workers.
        for _ in range(6):
            metrics = (await asyncio.to_thread(http_get, server.http + "/metrics"))[2]
            assert gauge(metrics, "wsbroker_connections") == len(clients)
            assert gauge(metrics, "wsbroker_subscriptions") == len(clients)
            assert gauge(metrics, "wsbroker_messages_delivered_total") == len(clients)
            assert gauge(metrics, "wsbroker_backplane_up") == 1

        server.signal()
        codes = await asyncio.gather(*(client.closed(timeout=10) for client in clients))
        assert {code for code, _ in codes} == {1012}
    assert await asyncio.to_thread(server.wait, 15) == 0


def test_workers_without_redis_refuse_to_start() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "wsbroker", "serve", "--workers", "2", "--jwt-secret", SECRET],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "--redis-url" in result.stderr


async def test_publish_command_through_redis_reaches_listen_on_another_node(
    redis_server: RedisServer, server_process: Callable[..., ServerProcess]
) -> None:
    first = server_process("--redis-url", redis_server.url, "--jwt-secret", SECRET)
    second = server_process("--redis-url", redis_server.url, "--jwt-secret", SECRET)
    listen = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wsbroker", "listen", second.url, "orders.eu", "orders.us",
        "--token", make_token(), "--count", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    # listen prints nothing until a message arrives: wait for its Redis subscriptions.
    async with aioredis.Redis.from_url(redis_server.url) as backend:

        async def listening() -> bool:
            return bool((await backend.pubsub_numsub("ws:orders.us"))[0][1])

        await eventually(listening, timeout=15)
    for channel, body in (("orders.eu", '{"id": 1}'), ("orders.us", '{"id": 2}')):
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "wsbroker", "publish", channel, body,
             "--redis-url", redis_server.url],
            capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 0, result.stderr
    stdout, stderr = await asyncio.wait_for(listen.communicate(), 20)
    assert listen.returncode == 0, stderr
    lines = stdout.decode().splitlines()
    assert lines == ['{"type":"message","channel":"orders.eu","data":{"id":1}}',
                     '{"type":"message","channel":"orders.us","data":{"id":2}}']
    assert first.process is not None and first.process.poll() is None


def test_workers_without_a_key_refuse_once_with_exit_2(redis_server: RedisServer) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "wsbroker", "serve", "--workers", "2",
         "--redis-url", redis_server.url],
        capture_output=True, text=True, timeout=30, env=clean_env(),
    )
    assert result.returncode == 2
    assert result.stderr.count("--jwt-secret") == 1, result.stderr


async def test_dev_workers_share_the_printed_token(
    redis_server: RedisServer, server_process: Callable[..., ServerProcess]
) -> None:
    server = server_process("--dev", "--workers", "2", "--redis-url", redis_server.url,
                            "--node-id", "dv")
    tokens = [line.split(" ", 1)[1] for line in server.stdout.splitlines()
              if line.startswith("token: ")]
    assert len(tokens) == 1, server.stdout
    async with contextlib.AsyncExitStack() as stack:
        clients: list[Client] = []
        async with asyncio.timeout(15):
            while len(nodes_of(clients)) < 2:
                clients.append(await stack.enter_async_context(
                    Client.connect(server.url, tokens[0])))
        assert nodes_of(clients) == {"dv-1", "dv-2"}


def worker_pids(server: ServerProcess) -> dict[str, list[int]]:
    """Each worker's pids, in start order, from the parent's log."""
    pids: dict[str, list[int]] = {}
    for node_id, pid in re.findall(r"worker (\S+) started \(pid (\d+)\)", server.stderr):
        pids.setdefault(node_id, []).append(int(pid))
    return pids


async def scrape(server: ServerProcess) -> str:
    return (await asyncio.to_thread(http_get, server.http + "/metrics"))[2]


async def test_a_killed_worker_is_restarted_and_its_gauges_go_with_it(
    redis_server: RedisServer, server_process: Callable[..., ServerProcess]
) -> None:
    server = server_process("--workers", "2", "--redis-url", redis_server.url,
                            "--jwt-secret", SECRET, "--node-id", "wk", "--drain-seconds", "0.2")
    async with contextlib.AsyncExitStack() as stack:
        clients: list[Client] = []
        async with asyncio.timeout(15):
            while len(nodes_of(clients)) < 2:
                clients.append(await stack.enter_async_context(
                    Client.connect(server.url, make_token())))
        victims = [c for c in clients if c.welcome and c.welcome["node"] == "wk-1"]
        survivors = [c for c in clients if c not in victims]
        await eventually(lambda: len(worker_pids(server).get("wk-1", [])) == 1)
        (victim_pid,) = worker_pids(server)["wk-1"]
        os.kill(victim_pid, signal.SIGKILL)  # no drain, no goodbye: a crash
        for client in victims:
            assert (await client.closed())[0] is None  # no close frame: the process died

        # Restarted (logged, with a backoff), and the dead worker's connections are
        # no longer counted, whichever worker answers the scrape.
        await eventually(lambda: len(worker_pids(server).get("wk-1", [])) == 2, timeout=10)
        assert f"worker wk-1 (pid {victim_pid}) was killed by SIGKILL; restarting it in" in (
            server.stderr)

        async def counted_right() -> bool:
            scrapes = [await scrape(server) for _ in range(4)]  # both workers answer some
            return all(gauge(text, "wsbroker_connections") == len(survivors)
                       for text in scrapes)

        await eventually(counted_right, timeout=10)
        async with asyncio.timeout(15):  # the new wk-1 takes clients
            while "wk-1" not in nodes_of(clients[len(victims) + len(survivors):]):
                clients.append(await stack.enter_async_context(
                    Client.connect(server.url, make_token())))
        server.signal()
    assert await asyncio.to_thread(server.wait, 15) == 0


def test_workers_that_keep_crashing_make_the_parent_give_up_with_exit_1(
    redis_server: RedisServer,
) -> None:
    """Every worker dies at start (the port is held by a socket without SO_REUSEPORT)."""
    with socket.create_server(("127.0.0.1", 0)) as squatter:
        port = squatter.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "wsbroker", "serve", "--workers", "2", "--port", str(port),
             "--redis-url", redis_server.url, "--jwt-secret", SECRET, "--node-id", "cr"],
            capture_output=True, text=True, timeout=60, env=clean_env(),
        )
    assert result.returncode == 1, result.stderr
    assert "restarting it in" in result.stderr
    assert "giving up" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigterm_while_workers_start_still_drains_and_exits_0(tmp_path: Path) -> None:
    """The workers' Redis accepts connections and never answers, so they are still
    starting (for up to 10 s) when the SIGTERM comes."""
    with socket.create_server(("127.0.0.1", 0)) as mute_redis:
        url = f"redis://127.0.0.1:{mute_redis.getsockname()[1]}"
        server = ServerProcess("--workers", "2", "--redis-url", url, "--jwt-secret", SECRET,
                               "--node-id", "st", env=clean_env(), tmp=tmp_path)
        server.start(wait_ready=False)
        assert server.process is not None
        held: list[socket.socket] = []
        try:
            mute_redis.settimeout(15)
            for _ in range(2):  # both workers are inside their node's start-up
                held.append(mute_redis.accept()[0])
            started = time.monotonic()
            server.signal()
            assert server.wait(15) == 0, server.stderr
            assert time.monotonic() - started < 5
        finally:
            server.stop()
            for connection in held:
                connection.close()
    assert "Traceback" not in server.stderr
