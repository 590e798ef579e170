"""The ``wsbroker`` command line, run as real processes (SPEC §10).

Servers are real ``wsbroker serve`` processes; ``token``, ``publish`` and
``listen`` run as real subprocesses; WebSocket checks use real clients.
"""

from __future__ import annotations

import asyncio
import re
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import InvalidStatus

from tests.helpers import (
    SECRET,
    WAIT,
    Client,
    ServerProcess,
    clean_env,
    eventually,
    free_port,
    http_get,
    make_token,
)

StartServer = Callable[..., ServerProcess]
FAST_DRAIN = ("--drain-seconds", "0.2")
CLI_SECRET = "cli-secret-with-enough-entropy-0123456789"


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


async def cli(*args: str, env: dict[str, str] | None = None, limit: float = 20.0) -> Run:
    """Run ``python -m wsbroker ARGS`` to completion (bounded) and capture its output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wsbroker", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=clean_env(env),
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), limit)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


def assert_no_traceback(run: Run) -> None:
    assert "Traceback" not in run.stderr, run.stderr


async def get(url: str) -> tuple[int, str, str]:
    return await asyncio.to_thread(http_get, url)


async def wait_subscriptions(server: ServerProcess, count: int) -> None:
    """Wait until the server's /metrics reports ``count`` subscriptions."""
    async def reached() -> bool:
        _, _, body = await get(server.http + "/metrics")
        return f"wsbroker_subscriptions {count:.1f}" in body.splitlines()

    await eventually(reached, timeout=10)


def banner_printed(server: ServerProcess) -> bool:
    return "demo: " in server.stdout


def dev_banner(server: ServerProcess) -> tuple[str, str]:
    """The (token, demo URL) lines ``serve --dev`` printed, or AssertionError."""
    token = re.search(r"^token: (\S+)$", server.stdout, re.MULTILINE)
    demo = re.search(r"^demo: (\S+)$", server.stdout, re.MULTILINE)
    assert token and demo, server.stdout
    return token.group(1), demo.group(1)


@pytest.fixture
def not_websocket_server() -> Iterator[int]:
    """A loopback TCP service that answers like Redis would to an HTTP request."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(WAIT)
                conn.recv(4096)
                conn.sendall(b"-ERR unknown command 'GET'\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(WAIT)
    listener.close()


# -- serve: keys, environment, flags ---------------------------------------------------


async def test_serve_without_key_refuses_to_start() -> None:
    """`serve` with no key and no --dev exits 2 and says how to set a key."""
    run = await cli("serve", "--port", str(free_port()))
    assert run.returncode == 2
    assert "--jwt-secret" in run.stderr
    assert run.stdout == ""
    assert_no_traceback(run)


async def test_serve_takes_the_secret_from_the_environment(
    server_process: StartServer,
) -> None:
    """WSB_JWT_SECRET is enough to start; tokens signed with it are accepted; / is 404."""
    server = server_process(*FAST_DRAIN, env=clean_env({"WSB_JWT_SECRET": SECRET}))
    async with Client.connect(server.url, make_token("eve")) as client:
        assert client.welcome is not None and client.welcome["user"] == "eve"
    status, _, _ = await get(server.http + "/")
    assert status == 404


async def test_bad_serve_configuration_exits_2() -> None:
    """Unusable settings exit 2 with a message naming the flag."""
    cases = ((["--log-level", "verbose"], "--log-level"),
             (["--max-subscriptions", "zero"], "--max-subscriptions"),
             (["--workers", "2"], "--redis-url"),
             (["--max-send-buffer", "0"], "--max-send-buffer"),
             (["--jwks-url", "https://idp.invalid/jwks.json"], "--jwks-url"))
    runs = await asyncio.gather(*(
        cli("serve", "--jwt-secret", SECRET, "--port", str(free_port()), *args)
        for args, _ in cases))
    for (args, flag), run in zip(cases, runs, strict=True):
        assert run.returncode == 2, (args, run.stderr)
        assert flag in run.stderr, (args, run.stderr)
        assert_no_traceback(run)


async def test_serve_refuses_a_short_secret_outside_dev_mode() -> None:
    """A secret under 32 bytes exits 2 with advice; the secret itself is not echoed."""
    run = await cli("serve", "--port", str(free_port()), env={"WSB_JWT_SECRET": "hunter2"})
    assert run.returncode == 2
    assert "--jwt-secret is 7 bytes; use at least 32" in run.stderr
    assert "hunter2" not in run.stderr
    assert_no_traceback(run)


async def test_token_command_prints_only_a_token_the_node_accepts(
    server_process: StartServer,
) -> None:
    """`wsbroker token --sub bob --channels 'a.>'` prints one token; a node with the
    same secret accepts it and enforces its channels."""
    run = await cli("token", "--sub", "bob", "--channels", "a.>", "--jwt-secret", CLI_SECRET)
    assert run.returncode == 0, run.stderr
    token = run.stdout.strip()
    assert run.stdout == token + "\n"
    assert token.count(".") == 2 and " " not in token
    claims = jwt.decode(token, CLI_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "bob" and claims["channels"] == ["a.>"]
    assert 3590 <= claims["exp"] - time.time() <= 3610
    server = server_process("--jwt-secret", CLI_SECRET, *FAST_DRAIN, env=clean_env())
    async with Client.connect(server.url, token, how="header") as client:
        assert client.welcome is not None and client.welcome["user"] == "bob"
        assert (await client.request("subscribe", channel="a.b"))["type"] == "ok"
        assert (await client.request("subscribe", channel="b"))["code"] == "forbidden"
        assert (await client.request("publish", channel="a.b", data=1))["code"] == "forbidden"


async def test_token_command_options_and_environment() -> None:
    """--publish and --ttl go into the token; WSB_JWT_SECRET works; no key → exit 2."""
    run, missing, bad = await asyncio.gather(
        cli("token", "--sub", "svc", "--publish", "x.*,y.>", "--ttl", "5m",
            env={"WSB_JWT_SECRET": SECRET}),
        cli("token", "--sub", "svc"),
        cli("token", "--sub", "svc", "--channels", "a..b", "--jwt-secret", SECRET),
    )
    assert run.returncode == 0, run.stderr
    claims = jwt.decode(run.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["publish"] == ["x.*", "y.>"]
    assert "channels" not in claims
    assert 290 <= claims["exp"] - time.time() <= 310
    assert missing.returncode == 2 and "--jwt-secret" in missing.stderr
    assert missing.stdout == ""
    assert bad.returncode == 2 and "a..b" in bad.stderr
    assert_no_traceback(bad)


async def test_environment_variables_apply_and_flags_win(server_process: StartServer) -> None:
    """WSB_MAX_SUBSCRIPTIONS=1 limits subscriptions; --max-subscriptions 2 overrides it."""
    env = clean_env({"WSB_MAX_SUBSCRIPTIONS": "1", "WSB_JWT_SECRET": SECRET})
    from_env = server_process(*FAST_DRAIN, env=env)
    from_flag = server_process("--max-subscriptions", "2", *FAST_DRAIN, env=env)
    async with Client.connect(from_env.url, make_token()) as client:
        await client.subscribe("c.1")
        reply = await client.request("subscribe", channel="c.2")
        assert reply["code"] == "too_many_subscriptions"
    async with Client.connect(from_flag.url, make_token()) as client:
        await client.subscribe("c.1")
        await client.subscribe("c.2")
        reply = await client.request("subscribe", channel="c.3")
        assert reply["code"] == "too_many_subscriptions"


async def test_port_from_environment_and_flag_wins(
    server_process: StartServer, tmp_path: Path,
) -> None:
    """WSB_PORT picks the port when --port is absent; --port wins when both are given."""
    env_port, flag_port = free_port(), free_port()
    env = clean_env({"WSB_PORT": str(env_port), "WSB_JWT_SECRET": SECRET})
    flagged = server_process(*FAST_DRAIN, env=env, port=flag_port)
    assert (await get(flagged.http + "/healthz"))[0] == 200
    with pytest.raises(OSError):
        await get(f"http://127.0.0.1:{env_port}/healthz")
    env_only = ServerProcess(*FAST_DRAIN, env=env, tmp=tmp_path, port=env_port)
    env_only.args.remove("--port")
    env_only.args.remove(str(env_port))
    try:
        env_only.start()  # waits for /healthz on env_port
        async with Client.connect(env_only.url, make_token()) as client:
            assert client.welcome is not None
    finally:
        env_only.stop()


# -- serve --dev -------------------------------------------------------------------------------


async def test_dev_mode_prints_token_and_demo_url_and_serves_demo(
    server_process: StartServer,
) -> None:
    """`serve --dev` prints `token: …` and `demo: http://…/#token=…`; the token may
    subscribe and publish anywhere; `/` serves the demo page."""
    server = server_process("--dev", *FAST_DRAIN, env=clean_env())
    await eventually(lambda: banner_printed(server), timeout=10)
    token, demo = dev_banner(server)
    assert demo == f"http://127.0.0.1:{server.port}/#token={token}"
    assert token not in server.stderr
    status, content_type, body = await get(server.http + "/")
    assert status == 200 and content_type.startswith("text/html")
    assert "<title>wsbroker demo</title>" in body
    async with Client.connect(server.url, token, how="message") as client:
        assert client.welcome is not None
        await client.subscribe("anything.at.all")
        reply = await client.request("publish", channel="anything.at.all", data={"n": 1})
        assert reply["type"] == "ok"
        message = await client.next_message()
        assert message["data"] == {"n": 1} and message["from"] == client.welcome["user"]


async def test_dev_mode_uses_configured_key_and_public_demo_channels(
    server_process: StartServer,
) -> None:
    """With --dev and --jwt-secret the printed token uses that secret, and `demo.>` is
    public by default: a token with no channels may subscribe there (only), not publish."""
    server = server_process("--dev", "--jwt-secret", SECRET, *FAST_DRAIN, env=clean_env())
    await eventually(lambda: banner_printed(server), timeout=10)
    token, _ = dev_banner(server)
    assert jwt.decode(token, SECRET, algorithms=["HS256"])["sub"]
    async with Client.connect(server.url, make_token("guest", channels=[])) as guest:
        assert (await guest.request("subscribe", channel="demo.chat"))["type"] == "ok"
        assert (await guest.request("subscribe", channel="other.chat"))["code"] == "forbidden"
        assert (await guest.request("publish", channel="demo.chat", data=1))["code"] == (
            "forbidden")


# -- publish and listen ------------------------------------------------------------------------


async def test_publish_reaches_listen(server_process: StartServer) -> None:
    """`wsbroker publish CH JSON --url --token` reaches `wsbroker listen URL CH --count 1`,
    which prints one JSON line with `data` and `from`, then exits 0."""
    server = server_process("--jwt-secret", SECRET, *FAST_DRAIN, env=clean_env())
    listener = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wsbroker", "listen", server.url, "news.x",
        "--token", make_token("reader", channels=["news.>"]), "--count", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=clean_env(),
    )
    try:
        await wait_subscriptions(server, 1)
        run = await cli("publish", "news.x", '{"headline": "hi", "n": [1, 2]}',
                        "--url", server.url, "--token", make_token("writer", publish=["news.>"]))
        assert run.returncode == 0, run.stderr
        out, err = await asyncio.wait_for(listener.communicate(), 10)
    finally:
        if listener.returncode is None:
            listener.kill()
            await listener.wait()
    assert listener.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert len(lines) == 1, lines
    assert orjson.loads(lines[0]) == {"type": "message", "channel": "news.x",
                                      "data": {"headline": "hi", "n": [1, 2]}, "from": "writer"}


async def test_publish_and_listen_take_the_token_from_the_environment(
    server_process: StartServer,
) -> None:
    """WSB_TOKEN (and WSB_URL for publish) stand in for --token/--url."""
    server = server_process("--jwt-secret", SECRET, *FAST_DRAIN, env=clean_env())
    async with Client.connect(server.url, make_token("watcher")) as watcher:
        await watcher.subscribe("env.x")
        run = await cli("publish", "env.x", "42",
                        env={"WSB_URL": server.url, "WSB_TOKEN": make_token(publish=["env.x"])})
        assert run.returncode == 0, run.stderr
        message = await watcher.next_message()
        assert (message["data"], message["from"]) == (42, "alice")


async def test_publish_without_permission_fails_clearly(server_process: StartServer) -> None:
    """A token that may not publish there → non-zero exit, `forbidden` on stderr."""
    server = server_process("--jwt-secret", SECRET, *FAST_DRAIN, env=clean_env())
    run = await cli("publish", "news.x", "1", "--url", server.url, "--token", make_token())
    assert run.returncode == 1
    assert "forbidden" in run.stderr
    assert_no_traceback(run)


async def test_publish_invalid_json_exits_2() -> None:
    """`publish` with invalid JSON exits 2 with a message, before connecting anywhere."""
    run, bad_channel = await asyncio.gather(
        cli("publish", "news.x", "{not json", "--url", f"ws://127.0.0.1:{free_port()}/ws",
            "--token", make_token()),
        cli("publish", "news..x", "1", "--token", make_token()),
    )
    assert run.returncode == 2
    assert "JSON" in run.stderr
    assert_no_traceback(run)
    assert bad_channel.returncode == 2 and "news..x" in bad_channel.stderr


async def test_listen_with_refused_token_fails_clearly(server_process: StartServer) -> None:
    """`listen` with a token the node refuses → non-zero exit, message with HTTP 401."""
    server = server_process("--jwt-secret", SECRET, *FAST_DRAIN, env=clean_env())
    run = await cli("listen", server.url, "news.x", "--token",
                    make_token(secret="wrong-secret-0123456789abcdef0123"), "--count", "1")
    assert run.returncode != 0
    assert "401" in run.stderr and "signature" in run.stderr
    assert run.stdout == ""
    assert_no_traceback(run)
    forbidden = await cli("listen", server.url, "news.x", "--token",
                          make_token(channels=["other.>"]), "--count", "1")
    assert forbidden.returncode != 0 and "forbidden" in forbidden.stderr
    assert_no_traceback(forbidden)


@pytest.mark.parametrize("url", ["not-a-url", "http://127.0.0.1:9/ws"])
async def test_listen_with_malformed_url_fails_clearly(url: str) -> None:
    """`listen` with a URL that is not ws:// or wss:// → non-zero exit and says so."""
    run = await cli("listen", url, "news.x", "--token", make_token())
    assert run.returncode != 0
    assert "ws://" in run.stderr and url in run.stderr
    assert_no_traceback(run)


async def test_listen_with_nothing_listening_fails_clearly() -> None:
    """`listen` to a port where nothing listens → non-zero exit, `cannot connect`."""
    url = f"ws://127.0.0.1:{free_port()}/ws"
    run = await cli("listen", url, "news.x", "--token", make_token())
    assert run.returncode != 0
    assert "cannot connect" in run.stderr and url in run.stderr
    assert_no_traceback(run)


async def test_listen_to_a_server_that_is_not_websocket_fails_clearly(
    not_websocket_server: int,
) -> None:
    """`listen` pointed at another service (e.g. Redis's port) → non-zero exit and a
    one-line message naming the URL, not a Python traceback."""
    url = f"ws://127.0.0.1:{not_websocket_server}/ws"
    run = await cli("listen", url, "news.x", "--token", make_token())
    assert run.returncode != 0
    assert url in run.stderr
    assert_no_traceback(run)


async def test_listen_wrong_path_gets_404_message(server_process: StartServer) -> None:
    """`listen` at a wsbroker node but the wrong path → non-zero exit, HTTP 404 message."""
    server = server_process("--jwt-secret", SECRET, *FAST_DRAIN, env=clean_env())
    url = f"ws://127.0.0.1:{server.port}/socket"
    run = await cli("listen", url, "news.x", "--token", make_token())
    assert run.returncode != 0 and "404" in run.stderr
    assert_no_traceback(run)
    with pytest.raises(InvalidStatus):  # and the same for any client
        async with Client.connect(url, make_token()):
            pass


# -- asymmetric keys, configuration errors, shutdown ---------------------------------------


def write_key_pair(directory: Path, kind: str) -> tuple[Path, Path]:
    """A private key (PKCS#8 PEM) and its public key (SPKI PEM) in ``directory``."""
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "RS256" else ec.generate_private_key(ec.SECP256R1()))
    private_path, public_path = directory / f"{kind}.key", directory / f"{kind}.pub"
    private_path.write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    public_path.write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


@pytest.mark.parametrize("kind", ["RS256", "ES256"])
async def test_token_signed_with_private_key_is_accepted_by_public_key_node(
    server_process: StartServer, tmp_path: Path, kind: str,
) -> None:
    """`token --jwt-private-key` picks the algorithm from the key and sets --kid; a node
    with `--jwt-public-key` and that algorithm accepts the token."""
    private_path, public_path = write_key_pair(tmp_path, kind)
    run = await cli("token", "--sub", "svc", "--channels", ">", "--kid", "key-1",
                    "--jwt-private-key", str(private_path))
    assert run.returncode == 0, run.stderr
    token = run.stdout.strip()
    assert jwt.get_unverified_header(token) == {"alg": kind, "kid": "key-1", "typ": "JWT"}
    server = server_process("--jwt-public-key", str(public_path), "--jwt-algorithms", kind,
                            *FAST_DRAIN, env=clean_env())
    async with Client.connect(server.url, token, how="header") as client:
        assert client.welcome is not None and client.welcome["user"] == "svc"
    with pytest.raises(InvalidStatus) as refused:  # HS256 is off with a public key
        async with Client.connect(server.url, make_token()):
            pass
    assert refused.value.response.status_code == 401


async def test_token_with_unusable_private_key_exits_2(tmp_path: Path) -> None:
    """`token --jwt-private-key` naming a missing or non-PEM file exits 2 with a message."""
    not_pem = tmp_path / "not-a-key.pem"
    not_pem.write_text("hello\n")
    paths = (tmp_path / "missing.pem", not_pem)
    runs = await asyncio.gather(*(cli("token", "--sub", "svc", "--jwt-private-key", str(path))
                                  for path in paths))
    for path, run in zip(paths, runs, strict=True):
        assert run.returncode == 2, run.stderr
        assert str(path.name) in run.stderr or "key" in run.stderr
        assert run.stdout == ""
        assert_no_traceback(run)


async def test_serve_with_unusable_key_configuration_exits_2(tmp_path: Path) -> None:
    """A public key with only HS* algorithms allowed, or a missing key file, is a
    configuration error: exit 2 with a message naming the flag to change."""
    _, public_path = write_key_pair(tmp_path, "ES256")
    mismatch, missing = await asyncio.gather(
        cli("serve", "--port", str(free_port()), "--jwt-public-key", str(public_path)),
        cli("serve", "--port", str(free_port()), "--jwt-public-key", str(tmp_path / "no.pem")),
    )
    assert mismatch.returncode == 2, mismatch.stderr
    assert "--jwt-algorithms" in mismatch.stderr
    assert missing.returncode == 2, missing.stderr
    assert "no.pem" in missing.stderr
    for run in (mismatch, missing):
        assert_no_traceback(run)


async def test_serve_on_a_busy_port_exits_1() -> None:
    """A port already in use → exit 1 (a run-time failure) with a `cannot start` message."""
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = str(busy.getsockname()[1])
        run = await cli("serve", "--port", port, "--jwt-secret", SECRET)
    assert run.returncode == 1
    assert "cannot start" in run.stderr
    assert_no_traceback(run)


async def test_listen_reports_server_shutdown(server_process: StartServer) -> None:
    """When the node shuts down under a running `listen`, it exits non-zero and says the
    server closed the connection (code 1012)."""
    server = server_process("--jwt-secret", SECRET, *FAST_DRAIN, env=clean_env())
    listener = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wsbroker", "listen", server.url, "news.x", "--token",
        make_token(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )
    try:
        await wait_subscriptions(server, 1)
        server.signal()
        _, err = await asyncio.wait_for(listener.communicate(), 10)
    finally:
        if listener.returncode is None:
            listener.kill()
            await listener.wait()
    assert listener.returncode != 0
    message = err.decode()
    assert "closed by the server" in message and "1012" in message
    assert "Traceback" not in message
    assert await asyncio.to_thread(server.wait, 15) == 0


async def test_publish_with_bad_or_unreachable_redis_fails_clearly() -> None:
    """`publish --redis-url`: a malformed URL exits 2 with a message; a Redis that does
    not answer (nothing on that loopback port) exits 1 with `cannot reach Redis`."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    malformed, unreachable = await asyncio.gather(
        cli("publish", "news.x", "1", "--redis-url", "not-a-redis-url"),
        cli("publish", "news.x", "1", "--redis-url", url),
    )
    assert malformed.returncode == 2, malformed.stderr
    assert "not-a-redis-url" in malformed.stderr or "redis://" in malformed.stderr
    assert_no_traceback(malformed)
    assert unreachable.returncode == 1
    assert "cannot reach Redis" in unreachable.stderr and url in unreachable.stderr
    assert_no_traceback(unreachable)


async def test_publish_and_listen_without_token_exit_2() -> None:
    """With no token (flag or WSB_TOKEN) and no Redis, publish and listen exit 2 and say
    which setting is missing."""
    url = f"ws://127.0.0.1:{free_port()}/ws"
    cases = (("publish", "news.x", "1", "--url", url), ("listen", url, "news.x"))
    for run in await asyncio.gather(*(cli(*args) for args in cases)):
        assert run.returncode == 2, run.stderr
        assert "--token" in run.stderr and "WSB_TOKEN" in run.stderr
        assert_no_traceback(run)


async def test_dev_mode_with_a_public_key_still_serves_the_demo(
    server_process: StartServer, tmp_path: Path,
) -> None:
    """`serve --dev --jwt-public-key …` cannot mint a token, but still runs: it prints the
    demo URL, serves `/`, and accepts tokens signed by the matching private key."""
    private_path, public_path = write_key_pair(tmp_path, "ES256")
    server = server_process("--dev", "--jwt-public-key", str(public_path),
                            "--jwt-algorithms", "ES256", *FAST_DRAIN, env=clean_env())
    assert server.process is not None
    process = server.process
    await eventually(lambda: banner_printed(server) or process.poll() is not None, timeout=10)
    assert process.poll() is None, f"server exited:\n{server.stderr}"
    assert f"demo: http://127.0.0.1:{server.port}/" in server.stdout
    assert "Traceback" not in server.stderr
    assert (await get(server.http + "/"))[0] == 200
    run = await cli("token", "--sub", "dev-user", "--jwt-private-key", str(private_path))
    assert run.returncode == 0, run.stderr
    async with Client.connect(server.url, run.stdout.strip(), how="message") as client:
        assert (await client.subscribe("demo.chat"))["channel"] == "demo.chat"


async def test_publish_never_prints_the_redis_password() -> None:
    url = f"redis://user:S3cretPassw0rd@127.0.0.1:{free_port()}/0"
    result = await cli("publish", "chan", '{"a": 1}', "--redis-url", url)
    assert result.returncode == 1
    assert "cannot reach Redis" in result.stderr
    assert "S3cretPassw0rd" not in result.stderr + result.stdout


async def test_publish_to_an_unreachable_cluster_fails_clearly() -> None:
    url = f"redis://127.0.0.1:{free_port()}"
    run = await cli("publish", "news.x", "1", "--redis-url", url, "--redis-cluster")
    assert run.returncode == 1, run.stderr
    assert "cannot reach Redis Cluster" in run.stderr and url in run.stderr
    assert_no_traceback(run)


@pytest.fixture
async def silent_websocket_server() -> AsyncIterator[str]:
    """A WebSocket server that accepts the upgrade and then never says a word."""
    async def handler(connection: ServerConnection) -> None:
        await connection.wait_closed()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws"


async def test_publish_and_listen_give_up_on_a_node_that_never_welcomes(
    silent_websocket_server: str,
) -> None:
    started = time.monotonic()
    runs = await asyncio.gather(
        cli("publish", "news.x", "1", "--url", silent_websocket_server, "--token", "t",
            "--timeout", "1"),
        cli("listen", silent_websocket_server, "news.x", "--token", "t", "--timeout", "1"),
    )
    assert time.monotonic() - started < 10
    for run in runs:
        assert run.returncode == 1, run.stderr
        assert "sent no welcome within 1 s" in run.stderr
        assert_no_traceback(run)


async def test_listen_gives_up_on_a_server_that_never_answers_the_handshake() -> None:
    with socket.create_server(("127.0.0.1", 0)) as mute:  # accepts (backlog), never answers
        port = mute.getsockname()[1]
        run = await cli("listen", f"ws://127.0.0.1:{port}/ws", "news.x", "--token", "t",
                        "--timeout", "1")
    assert run.returncode == 1, run.stderr
    assert "no WebSocket handshake within 1 s" in run.stderr
    assert_no_traceback(run)
