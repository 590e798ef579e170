"""What a real ``wsbroker serve`` writes to its logs (SPEC §2: never log a token; §10).

The node runs at debug level, where the websockets library logs request lines,
headers and frames; no token (nor any part of one) may survive in them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from websockets.exceptions import InvalidStatus

from tests.helpers import SECRET, Client, ServerProcess, make_token
from wsbroker.logs import redact, safe_url

StartServer = Callable[..., ServerProcess]
DEBUG = ("--jwt-secret", SECRET, "--log-level", "debug", "--drain-seconds", "0.2")
OPAQUE_SECRET = "opaque-not-a-jwt-but-secret-4f7c2a9e"


def clean_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("WSB_")}


async def exercise(server: ServerProcess) -> list[str]:
    """Authenticate every way, good and bad; return every token that was sent."""
    by_query = make_token("q-user")
    by_header = make_token("h-user")
    by_message = make_token("m-user", ttl=7200)
    refreshed = make_token("m-user", ttl=3600)
    spaced = make_token("s-user", ttl=1800)
    invalid = make_token("intruder", secret="wrong-secret-0123456789abcdef0123")
    async with Client.connect(server.url, by_query, how="query") as client:
        await client.subscribe("logs.q")
    async with Client.connect(server.url, by_header, how="header") as client:
        await client.subscribe("logs.h")
    async with Client.connect(server.url, by_message, how="message") as client:
        assert (await client.request("auth", token=refreshed))["type"] == "ok"
    async with Client.connect(server.url, how="none") as client:
        await client.send(json.dumps({"token": spaced, "op": "auth", "id": 1}, indent=1))
        assert (await client.receive())["type"] == "welcome"
    for token in (invalid, OPAQUE_SECRET):
        for how in ("query", "header"):
            with pytest.raises(InvalidStatus) as refused:
                async with Client.connect(server.url, token, how=how):
                    pass
            assert refused.value.response.status_code == 401
        async with Client.connect(server.url, token, how="message", expect_welcome=False) as c:
            assert (await c.closed())[0] == 4001
    return [by_query, by_header, by_message, refreshed, spaced, invalid, OPAQUE_SECRET]


def stop(server: ServerProcess) -> None:
    server.signal(signal.SIGTERM)
    assert server.wait(15) == 0, server.stderr


def assert_no_secret(server: ServerProcess, tokens: list[str]) -> None:
    """No token, nor its payload or signature part, appears in stdout or stderr."""
    output = server.stdout + server.stderr
    for token in tokens:
        assert token not in output
        for part in token.split(".")[1:]:
            assert len(part) < 8 or part not in output, f"token part leaked: {part[:12]}…"
    assert SECRET not in output


async def test_debug_logs_never_contain_tokens(server_process: StartServer) -> None:
    """At --log-level debug the handshake and frames are logged, tokens redacted."""
    server = server_process(*DEBUG, env=clean_env())
    tokens = await exercise(server)
    stop(server)
    assert_no_secret(server, tokens)
    stderr = server.stderr
    assert "GET /ws" in stderr, "debug logs should show the handshake"
    assert "[redacted" in stderr, "the token-carrying lines should be there, redacted"
    assert "DEBUG" in stderr
    assert server.stdout == ""


async def test_json_log_format_is_one_object_per_line(server_process: StartServer) -> None:
    """--log-format json: every stderr line is one JSON object with ts, level, logger,
    msg; tokens are redacted there too."""
    server = server_process(*DEBUG, "--log-format", "json", env=clean_env())
    tokens = await exercise(server)
    stop(server)
    assert_no_secret(server, tokens)
    lines = server.stderr.splitlines()
    assert len(lines) > 10
    entries: list[dict[str, Any]] = []
    for line in lines:
        entry = orjson.loads(line)
        assert isinstance(entry, dict), line
        assert {"ts", "level", "logger", "msg"} <= entry.keys(), line
        entries.append(entry)
    levels = {entry["level"] for entry in entries}
    assert {"debug", "info"} <= levels
    assert any(entry["logger"].startswith("websockets") for entry in entries)
    assert any("[redacted" in entry["msg"] for entry in entries)


async def test_info_logs_are_quiet_about_connections(server_process: StartServer) -> None:
    """At the default level a node logs its start and stop, not each handshake."""
    server = server_process("--jwt-secret", SECRET, "--drain-seconds", "0.2", env=clean_env())
    async with Client.connect(server.url, make_token()) as client:
        await client.subscribe("quiet.x")
    await asyncio.sleep(0)
    stop(server)
    stderr = server.stderr
    assert "listening on" in stderr
    assert "GET /ws" not in stderr
    assert "DEBUG" not in stderr


async def test_percent_encoded_token_parameter_is_redacted(server_process: StartServer) -> None:
    """`?%74oken=%65yJ…` is `?token=eyJ…` to the node (it authenticates), but matches no
    pattern for a token's name or shape: the whole query string is what gets redacted."""
    server = server_process(*DEBUG, env=clean_env())
    token = make_token("pct-user")
    encoded = "%65" + token[1:]  # "e" of "eyJ…", percent-encoded
    url = f"{server.url}?%74oken={encoded}&x=1"
    async with Client.connect(url, how="none", expect_welcome=False) as client:
        assert (await client.receive())["user"] == "pct-user"
    stop(server)
    assert_no_secret(server, [token])
    assert "GET /ws?[redacted] HTTP/1.1" in server.stderr


@pytest.mark.parametrize(("line", "logged"), [
    ("< GET /ws?%74oken=abc.def&a=b HTTP/1.1", "< GET /ws?[redacted] HTTP/1.1"),
    ("fetch https://idp/jwks?key=opaque failed", "fetch https://idp/jwks?[redacted] failed"),
    ("GET /healthz HTTP/1.1", "GET /healthz HTTP/1.1"),
    ("is it? yes", "is it? yes"),
])
def test_query_strings_are_redacted_whole(line: str, logged: str) -> None:
    assert redact(line) == logged


def test_safe_url_hides_user_info_and_query() -> None:
    assert safe_url("https://u:p%40ss@idp.example:8443/keys?api_key=k#frag") == (
        "https://[redacted]@idp.example:8443/keys?[redacted]")
    assert safe_url("https://idp.example/keys") == "https://idp.example/keys"
