"""``wsbroker bench`` (SPEC §15): a real bench process against real nodes and Redis.

The figures themselves are not asserted (speed is measured, not tested); what
is asserted is what a user relies on: every expected delivery counted once,
loss and duplicates detected, TLS through a private CA, clear refusals.
"""

from __future__ import annotations

import contextlib
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme

from tests.helpers import SECRET, ServerProcess, free_port
from tests.redis_server import RedisServer
from tests.test_tls import https_get
from wsbroker.bench.messages import message
from wsbroker.bench.subscribers import Audience, Endpoint, Subscriber

BENCH_LIMIT = 60.0
API_KEY = "bench-api-key-0123456789abcdef"


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wsbroker", "bench", *args],
                          capture_output=True, text=True, timeout=BENCH_LIMIT, check=False)


def report(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert "Traceback" not in result.stderr, result.stderr
    parsed: dict[str, Any] = orjson.loads(result.stdout)
    return parsed


def test_every_delivery_is_counted_once(
    redis_server: RedisServer, server_process: Callable[..., ServerProcess]
) -> None:
    node = server_process("--jwt-secret", SECRET, "--redis-url", redis_server.url)
    result = bench(node.url, "--jwt-secret", SECRET, "--redis-url", redis_server.url,
                   "--subscribers", "40", "--channels", "4", "--rate", "100",
                   "--duration", "1", "--json")
    assert result.returncode == 0, result.stderr
    figures = report(result)
    assert figures["connect"]["subscribed"] == 40
    assert figures["publish"]["sent"] == 100
    # 100 messages round-robin over 4 channels of 10 subscribers each.
    assert figures["deliveries"]["expected"] == 1000
    assert figures["deliveries"]["delivered"] == 1000
    assert figures["deliveries"]["lost"] == 0
    assert figures["deliveries"]["duplicated"] == 0
    assert 0 < figures["latency_ms"]["p50"] <= figures["latency_ms"]["p99"]


def test_the_text_report_names_the_figures(
    redis_server: RedisServer, server_process: Callable[..., ServerProcess]
) -> None:
    node = server_process("--jwt-secret", SECRET, "--redis-url", redis_server.url)
    result = bench(node.url, "--jwt-secret", SECRET, "--redis-url", redis_server.url,
                   "--subscribers", "10", "--rate", "50", "--duration", "0.5")
    assert result.returncode == 0, result.stderr
    for words in ("connects/s", "deliveries  250 of 250", "p99", "lost 0  duplicated 0"):
        assert words in result.stdout


def wait_https(url: str, context: ssl.SSLContext, node: ServerProcess) -> None:
    deadline = time.monotonic() + 15
    while True:
        assert node.process is not None and node.process.poll() is None, node.stderr
        with contextlib.suppress(OSError):
            if https_get(url, context)[0] == 200:
                return
        assert time.monotonic() < deadline, node.stderr
        time.sleep(0.05)


def test_wss_with_a_private_ca(
    tmp_path: Path, ca: trustme.CA, client_tls: ssl.SSLContext, redis_server: RedisServer,
    server_process: Callable[..., ServerProcess],
) -> None:
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, bundle = tmp_path / "node.crt", tmp_path / "node.key", tmp_path / "ca.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(key)
    ca.cert_pem.write_to_path(bundle)
    node = server_process("--jwt-secret", SECRET, "--redis-url", redis_server.url,
                          "--tls-cert", str(cert), "--tls-key", str(key), wait_ready=False)
    wait_https(f"https://localhost:{node.port}/healthz", client_tls, node)
    url = f"wss://localhost:{node.port}/ws"
    args = ("--jwt-secret", SECRET, "--redis-url", redis_server.url, "--subscribers", "10",
            "--rate", "20", "--duration", "0.5", "--json")
    result = bench(url, "--ca-file", str(bundle), *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert report(result)["deliveries"]["delivered"] == 100
    untrusted = bench(url, *args)  # the system CAs do not know this one
    assert untrusted.returncode == 1
    assert report(untrusted)["connect"]["subscribed"] == 0
    assert "CERTIFICATE_VERIFY_FAILED" in str(report(untrusted)["connect"]["failures"])


def test_a_refused_token_is_reported_not_raised(
    redis_server: RedisServer, server_process: Callable[..., ServerProcess]
) -> None:
    node = server_process("--jwt-secret", SECRET, "--redis-url", redis_server.url)
    result = bench(node.url, "--jwt-secret", "another-secret-that-is-long-enough-0123456",
                   "--redis-url", redis_server.url, "--subscribers", "5", "--rate", "10",
                   "--duration", "0.2", "--json")
    assert result.returncode == 1
    figures = report(result)
    assert figures["connect"]["failed"] == 5
    assert any("401" in reason for reason in figures["connect"]["failures"])


@pytest.mark.parametrize("args, words", [
    (("--redis-url", "redis://127.0.0.1:1"), "--token"),
    (("--token", "t"), "--redis-url"),
    (("--token", "t", "--redis-url", "redis://x", "--channels", "5", "--subscribers", "2"),
     "--channels"),
])
def test_usage_errors_exit_2_with_a_message(args: tuple[str, ...], words: str) -> None:
    result = bench("ws://127.0.0.1:1/ws", *args)
    assert result.returncode == 2
    assert words in result.stderr and "Traceback" not in result.stderr


def test_not_a_websocket_url_is_a_usage_error() -> None:
    result = bench("http://127.0.0.1:1/ws", "--token", "t", "--redis-url", "redis://x")
    assert result.returncode == 2
    assert "ws:// or wss://" in result.stderr


# -- the counting itself, frame by frame (no sockets) ------------------------------


def frame(payload: bytes) -> bytes:
    assert len(payload) < 126
    return bytes((0x81, len(payload))) + payload


async def test_duplicates_gaps_and_stragglers_are_told_apart() -> None:
    audience = Audience(Endpoint.from_url("ws://127.0.0.1:1/ws"))
    subscriber = Subscriber(audience, "bench.0", 1)
    subscriber.open = True
    audience.begin(2)
    one, three = message(2, 1, 60), message(2, 3, 60)
    # One chunk split mid-frame, as TCP may deliver it.
    stream = frame(one) + frame(one) + frame(three) + frame(message(1, 9, 60))
    subscriber.data_received(stream[:50])
    subscriber.data_received(stream[50:])
    counters = audience.counters
    assert (counters.unique, counters.dups, counters.gaps, counters.late) == (2, 1, 1, 1)


def test_publishing_through_the_http_api(
    redis_server: RedisServer, server_process: Callable[..., ServerProcess]
) -> None:
    api_port = free_port()
    node = server_process("--jwt-secret", SECRET, "--redis-url", redis_server.url,
                          "--api-port", str(api_port), "--api-key", API_KEY)
    result = bench(node.url, "--jwt-secret", SECRET, "--api-url",
                   f"http://127.0.0.1:{api_port}", "--api-key", API_KEY,
                   "--subscribers", "20", "--channels", "2", "--rate", "100",
                   "--duration", "0.5", "--json")
    assert result.returncode == 0, result.stderr
    figures = report(result)
    assert figures["deliveries"]["expected"] == figures["deliveries"]["delivered"] == 500


def test_a_refusing_api_is_a_clear_failure(
    redis_server: RedisServer, server_process: Callable[..., ServerProcess]
) -> None:
    api_port = free_port()
    node = server_process("--jwt-secret", SECRET, "--api-port", str(api_port),
                          "--api-key", API_KEY)
    result = bench(node.url, "--jwt-secret", SECRET, "--api-url",
                   f"http://127.0.0.1:{api_port}", "--api-key", "wrong-key-0123456789abcdef",
                   "--subscribers", "2", "--rate", "10", "--duration", "0.2")
    assert result.returncode == 1
    assert "publishing failed" in result.stderr and "401" in result.stderr
    assert "Traceback" not in result.stderr
