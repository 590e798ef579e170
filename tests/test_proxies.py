"""The committed load-balancer configs, run for real in front of a real fleet.

``deploy/haproxy.cfg`` and ``deploy/nginx.conf`` are used as committed, except
for the lines marked ``site:`` (listen address, certificate, node addresses,
runtime paths), which :func:`rewrite` replaces and which must each match
exactly once, so the files cannot drift away from what is tested. Behind the
proxy: two ``wsbroker serve`` processes on one real ``redis-server``; in front
of it: ``wss://`` clients trusting a ``trustme`` CA.

What is shown: TLS termination and the WebSocket upgrade work; a backend's raw
``PUBLISH ws:<channel>`` reaches clients on both nodes; a node sent SIGTERM
closes its clients with 1012, they reconnect through the proxy and land on the
other node without seeing the draining node's 503; the proxy stops sending new
clients to it (HAProxy through its /readyz check, nginx passively); the edge
proxy's X-Forwarded-For is the one the node logs. Also: the node believes
X-Forwarded-For only from ``--trusted-proxies``.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme

from tests.helpers import SECRET, WAIT, Client, ServerProcess, free_port, http_get, make_token
from tests.redis_server import RedisServer

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
CHANNEL = "news.flash"
BOUND = 15.0  # the longest any condition polled here may take


# -- rendering the committed configs -----------------------------------------------


def rewrite(text: str, replacements: list[tuple[str, str]], name: str) -> str:
    """Apply each (regex, replacement); each must match exactly one line."""
    for pattern, replacement in replacements:
        text, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        assert count == 1, (
            f"{name}: {pattern!r} matched {count} lines, expected 1: the file's "
            f"'site:' lines and tests/test_proxies.py disagree"
        )
    return text


def render_haproxy(tmp: Path, port: int, pem: Path, nodes: list[int]) -> Path:
    text = (DEPLOY / "haproxy.cfg").read_text()
    replacements = [
        (r"^(\s*stats socket )\S+", rf"\g<1>{tmp / 'admin.sock'}"),
        (r"^(\s*bind )\S+( ssl crt )\S+", rf"\g<1>127.0.0.1:{port}\g<2>{pem}"),
    ]
    replacements += [(rf"^(\s*server node{i} )\S+", rf"\g<1>127.0.0.1:{node_port}")
                     for i, node_port in enumerate(nodes, 1)]
    path = tmp / "haproxy.cfg"
    path.write_text(rewrite(text, replacements, "deploy/haproxy.cfg"))
    return path


def render_nginx(tmp: Path, port: int, cert: Path, key: Path, nodes: list[int]) -> Path:
    text = (DEPLOY / "nginx.conf").read_text()
    replacements = [
        (r"^(error_log )\S+", rf"\g<1>{tmp / 'error.log'}"),
        (r"^(pid )\S+;", rf"\g<1>{tmp / 'nginx.pid'};"),
        (r"^(\s*access_log )\S+ ", rf"\g<1>{tmp / 'access.log'} "),
        (r"^(\s*listen )443 ", rf"\g<1>127.0.0.1:{port} "),
        (r"^(\s*ssl_certificate\s+)\S+;", rf"\g<1>{cert};"),
        (r"^(\s*ssl_certificate_key\s+)\S+;", rf"\g<1>{key};"),
        # Not in the committed file: temporary files under the test's prefix,
        # so nginx needs no write access to /var/lib/nginx.
        (r"^http \{$", "http {\n" + "".join(
            f"    {kind}_temp_path {tmp / kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))),
    ]
    replacements += [(rf"^(\s*server )wsbroker-{i}:8765 ", rf"\g<1>127.0.0.1:{node_port} ")
                     for i, node_port in enumerate(nodes, 1)]
    path = tmp / "nginx.conf"
    path.write_text(rewrite(text, replacements, "deploy/nginx.conf"))
    return path


# -- processes -------------------------------------------------------------------


def wait_for(condition: Callable[[], Any], what: str, timeout: float = BOUND) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ssl.SSLError):
            result = condition()
            if result:
                return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class Proxy:
    """One proxy process we started, with its output in files; ended by its PID."""

    def __init__(self, argv: list[str], tmp: Path, port: int, name: str) -> None:
        self.port = port
        self.name = name
        self.log = tmp / f"{name}.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def check_running(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"{self.name} exited ({self.process.returncode}):\n"
                                 f"{self.output}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@pytest.fixture
def proxies() -> Iterator[list[Proxy]]:
    started: list[Proxy] = []
    yield started
    for proxy in started:
        proxy.stop()


def https_get(url: str, context: ssl.SSLContext) -> int:
    try:
        with urllib.request.urlopen(url, timeout=WAIT, context=context) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def start_fleet(server_process: Callable[..., ServerProcess], redis: RedisServer,
                *extra: str) -> dict[str, ServerProcess]:
    """Two nodes, ``node-a`` and ``node-b``, on one Redis, trusting the proxy on loopback."""
    return {
        node_id: server_process("--redis-url", redis.url, "--jwt-secret", SECRET,
                                "--drain-seconds", "1", "--trusted-proxies", "127.0.0.1",
                                "--node-id", node_id, "--log-level", "debug", *extra)
        for node_id in ("node-a", "node-b")
    }


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(found).exists():
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    return found


def nginx_binary() -> str:
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(found).exists():
        pytest.skip("nginx is not installed (apt-get install nginx)")
    return found


# -- HAProxy runtime API ---------------------------------------------------------------


def haproxy_command(sock_path: Path, command: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(WAIT)
        sock.connect(str(sock_path))
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def haproxy_servers(sock_path: Path) -> dict[str, dict[str, str]]:
    """``show stat`` rows of backend ``wsbroker``, by server name."""
    text = haproxy_command(sock_path, "show stat").lstrip("# ")
    rows = csv.DictReader(io.StringIO(text))
    return {row["svname"]: row for row in rows
            if row["pxname"] == "wsbroker" and row["svname"] not in ("BACKEND", "FRONTEND")}


def start_haproxy(tmp: Path, pem: Path, fleet: dict[str, ServerProcess],
                  client_tls: ssl.SSLContext) -> tuple[Proxy, Path]:
    port = free_port()
    config = render_haproxy(tmp, port, pem, [node.port for node in fleet.values()])
    binary = haproxy_binary()
    check = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 0, f"haproxy -c refused deploy/haproxy.cfg:\n{check.stdout}" \
                                  f"{check.stderr}"
    proxy = Proxy([binary, "-db", "-f", str(config)], tmp, port, "haproxy")
    sock = tmp / "admin.sock"

    def all_up() -> bool:
        proxy.check_running()
        servers = haproxy_servers(sock)
        return len(servers) == 2 and all(s["status"] == "UP" for s in servers.values())

    wait_for(all_up, "HAProxy to see both nodes UP")
    assert https_get(f"https://127.0.0.1:{port}/readyz", client_tls) == 200
    return proxy, sock


# -- the scenario, shared by both proxies --------------------------------------------------


class Fleet:
    """Clients connected through the proxy, and what they saw."""

    def __init__(self, url: str, tls: ssl.SSLContext, stack: contextlib.AsyncExitStack,
                 nodes: dict[str, ServerProcess]) -> None:
        self.url = url
        self.tls = tls
        self.stack = stack
        self.nodes = nodes

    async def connect(self, **headers: str) -> Client:
        client = await self.stack.enter_async_context(Client.connect(
            self.url, make_token("alice"), how="header", ssl=self.tls,
            additional_headers=headers))
        assert client.welcome is not None
        return client

    @staticmethod
    def node_of(client: Client) -> str:
        assert client.welcome is not None
        return str(client.welcome["node"])


def backend_publish(redis: RedisServer, data: dict[str, Any]) -> None:
    """What a backend service does: a raw PUBLISH of JSON to ``ws:<channel>``."""
    with redis.client() as conn:
        conn.publish(f"ws:{CHANNEL}", orjson.dumps(data))


async def expect(client: Client, data: dict[str, Any]) -> None:
    message = await client.next_message()
    assert message["channel"] == CHANNEL and message["data"] == data, message


async def run_failover(url: str, tls: ssl.SSLContext, nodes: dict[str, ServerProcess],
                       redis: RedisServer, taken_out: Callable[[str], bool]) -> None:
    """Connect through the proxy, publish, drain one node, check where everyone went.

    ``taken_out(node_id)`` says whether the proxy no longer routes to that node.
    """
    async with contextlib.AsyncExitStack() as stack:
        fleet = Fleet(url, tls, stack, nodes)
        clients = [await fleet.connect() for _ in range(4)]
        for client in clients:
            await client.subscribe(CHANNEL)
        placement = [fleet.node_of(c) for c in clients]
        assert set(placement) == set(nodes), f"least-connections left a node idle: {placement}"

        backend_publish(redis, {"n": 1})
        for client in clients:
            await expect(client, {"n": 1})

        victim = placement[0]
        (survivor,) = set(nodes) - {victim}
        nodes[victim].signal(signal.SIGTERM)

        moved = [c for c in clients if fleet.node_of(c) == victim]
        stayed = [c for c in clients if fleet.node_of(c) == survivor]

        async def reconnect(client: Client) -> Client:
            # As a client does on 1012: reconnect through the proxy, here at
            # once (a real client adds backoff and jitter). The first ones come
            # back while the node still drains and answers upgrades with 503,
            # later ones when it is gone; either way the proxy must retry on
            # the other node, so the client sees no error.
            code, _ = await client.closed(timeout=BOUND)
            assert code == 1012
            again = await fleet.connect()
            await again.subscribe(CHANNEL)
            return again

        reconnected = await asyncio.gather(*(reconnect(c) for c in moved))
        assert [fleet.node_of(c) for c in reconnected] == [survivor] * len(moved)

        assert await asyncio.to_thread(nodes[victim].wait, BOUND) == 0

        backend_publish(redis, {"n": 2})
        for client in [*stayed, *reconnected]:
            await expect(client, {"n": 2})

        await asyncio.to_thread(wait_for, lambda: taken_out(victim),
                                f"the proxy to take {victim} out")
        # Every new client lands on the survivor. They claim an address in
        # X-Forwarded-For: the edge proxy replaces it with the address it saw.
        fresh = [await fleet.connect(**{"X-Forwarded-For": "203.0.113.9"})
                 for _ in range(3)]
        assert [fleet.node_of(c) for c in fresh] == [survivor] * 3
        for client in fresh:
            await client.subscribe(CHANNEL)
        backend_publish(redis, {"n": 3})
        for client in [*stayed, *reconnected, *fresh]:
            await expect(client, {"n": 3})

        log = nodes[survivor].stderr
        client_id = fresh[0].welcome["client"] if fresh[0].welcome else None
        assert f"client {client_id} authenticated as 'alice' from 127.0.0.1" in log, log
        assert "203.0.113.9" not in log


# -- HAProxy -------------------------------------------------------------------------------


async def test_haproxy_tls_websocket_and_failover(
    tmp_path: Path, ca: trustme.CA, client_tls: ssl.SSLContext, redis_server: RedisServer,
    server_process: Callable[..., ServerProcess], proxies: list[Proxy],
) -> None:
    haproxy_binary()
    nodes = start_fleet(server_process, redis_server)
    pem = tmp_path / "haproxy.pem"
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(pem)
    proxy, sock = start_haproxy(tmp_path, pem, nodes, client_tls)
    proxies.append(proxy)
    names = dict(zip(nodes, ("node1", "node2"), strict=True))

    def taken_out(node_id: str) -> bool:
        return haproxy_servers(sock)[names[node_id]]["status"].startswith("DOWN")

    await run_failover(f"wss://127.0.0.1:{proxy.port}/ws", client_tls, nodes, redis_server,
                       taken_out)
    proxy.check_running()


async def test_haproxy_takes_a_draining_node_out_by_its_readiness(
    tmp_path: Path, ca: trustme.CA, client_tls: ssl.SSLContext, redis_server: RedisServer,
    server_process: Callable[..., ServerProcess], proxies: list[Proxy],
) -> None:
    """While a node drains, it is still alive but /readyz is 503: HAProxy's check
    (not a refused connection) takes it out, and the survivor gets every new client."""
    haproxy_binary()
    nodes = start_fleet(server_process, redis_server, "--drain-seconds", "30")
    pem = tmp_path / "haproxy.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(pem)
    proxy, sock = start_haproxy(tmp_path, pem, nodes, client_tls)
    proxies.append(proxy)
    url = f"wss://127.0.0.1:{proxy.port}/ws"
    victim = nodes["node-a"]
    async with contextlib.AsyncExitStack() as stack:
        # Two clients directly on the victim: the second is closed only
        # halfway through its 30 s drain, so the process outlives the check.
        for _ in range(2):
            await stack.enter_async_context(Client.connect(victim.url, make_token()))
        victim.signal(signal.SIGTERM)

        def node1_down() -> dict[str, str] | None:
            row = haproxy_servers(sock)["node1"]
            return row if row["status"].startswith("DOWN") else None

        # inter 1s fastinter 500ms fall 2: out ~1.3 s after SIGTERM (8 s for slow CI).
        row = await asyncio.to_thread(wait_for, node1_down, "HAProxy to mark node1 DOWN",
                                      timeout=8.0)
        assert row["check_status"] == "L7STS" and row["check_code"] == "503", row
        assert victim.process is not None and victim.process.poll() is None
        status = await asyncio.to_thread(https_get, f"https://127.0.0.1:{proxy.port}/healthz",
                                         client_tls)
        assert status == 200
        for _ in range(3):
            async with Client.connect(url, make_token(), ssl=client_tls) as client:
                assert client.welcome is not None and client.welcome["node"] == "node-b"
    assert victim.process is not None
    victim.process.kill()  # ours; skip the rest of its 30 s drain
    victim.process.wait(WAIT)


def test_haproxy_tls_profile(tmp_path: Path, ca: trustme.CA, client_tls: ssl.SSLContext,
                             redis_server: RedisServer,
                             server_process: Callable[..., ServerProcess],
                             proxies: list[Proxy]) -> None:
    """TLS 1.2 and 1.3 with forward-secret AEAD ciphers; TLS 1.0/1.1 refused."""
    haproxy_binary()
    nodes = start_fleet(server_process, redis_server)
    pem = tmp_path / "haproxy.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(pem)
    proxy, _ = start_haproxy(tmp_path, pem, nodes, client_tls)
    proxies.append(proxy)
    assert_modern_tls(proxy.port, ca)


def assert_modern_tls(port: int, ca: trustme.CA) -> None:
    def handshake(version: ssl.TLSVersion, ciphers: str | None = None) -> tuple[str, str]:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ca.configure_trust(context)
        with warnings.catch_warnings():  # TLS 1.0/1.1 are deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = context.maximum_version = version
        # Let the client offer anything, so that only the server can refuse.
        context.set_ciphers(ciphers or "ALL:@SECLEVEL=0")
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            version_name, cipher = tls.version() or "", (tls.cipher() or ("",))[0]
            return version_name, cipher

    assert handshake(ssl.TLSVersion.TLSv1_3)[0] == "TLSv1.3"
    version, cipher = handshake(ssl.TLSVersion.TLSv1_2)
    assert version == "TLSv1.2" and ("ECDHE" in cipher or "DHE" in cipher), cipher
    assert "GCM" in cipher or "CHACHA20" in cipher, cipher
    # A legacy CBC/RSA-key-exchange cipher alone is refused.
    with pytest.raises(ssl.SSLError):
        handshake(ssl.TLSVersion.TLSv1_2, "AES128-SHA:@SECLEVEL=0")
    for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            handshake(old)


# -- nginx ---------------------------------------------------------------------------------


def start_nginx(tmp: Path, ca: trustme.CA, fleet: dict[str, ServerProcess],
                client_tls: ssl.SSLContext) -> Proxy:
    binary = nginx_binary()
    cert, key = tmp / "server.crt", tmp / "server.key"
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(key)
    port = free_port()
    config = render_nginx(tmp, port, cert, key, [node.port for node in fleet.values()])
    argv = [binary, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(config)]
    check = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, f"nginx -t refused deploy/nginx.conf:\n{check.stderr}"
    proxy = Proxy([*argv, "-g", "daemon off;"], tmp, port, "nginx")

    def healthy() -> bool:
        proxy.check_running()
        return https_get(f"https://127.0.0.1:{port}/healthz", client_tls) == 200

    wait_for(healthy, "nginx to proxy /healthz")
    return proxy


async def test_nginx_tls_websocket_and_failover(
    tmp_path: Path, ca: trustme.CA, client_tls: ssl.SSLContext, redis_server: RedisServer,
    server_process: Callable[..., ServerProcess], proxies: list[Proxy],
) -> None:
    nginx_binary()
    nodes = start_fleet(server_process, redis_server)
    proxy = start_nginx(tmp_path, ca, nodes, client_tls)
    proxies.append(proxy)

    def taken_out(node_id: str) -> bool:
        # Passive only: the proxy takes a node out when a request to it fails.
        # Several fresh upgrades in a row must all reach the survivor.
        survivor = next(n for n in nodes if n != node_id)
        return all(_welcome_node(proxy.port, client_tls) == survivor for _ in range(3))

    await run_failover(f"wss://127.0.0.1:{proxy.port}/ws", client_tls, nodes, redis_server,
                       taken_out)
    proxy.check_running()
    assert "[emerg]" not in (tmp_path / "error.log").read_text()


def _welcome_node(port: int, tls: ssl.SSLContext) -> str:
    async def one() -> str:
        async with Client.connect(f"wss://127.0.0.1:{port}/ws", make_token(),
                                  ssl=tls) as client:
            assert client.welcome is not None
            return str(client.welcome["node"])

    return asyncio.run(one())


def test_nginx_tls_profile(tmp_path: Path, ca: trustme.CA, client_tls: ssl.SSLContext,
                           redis_server: RedisServer,
                           server_process: Callable[..., ServerProcess],
                           proxies: list[Proxy]) -> None:
    nginx_binary()
    nodes = start_fleet(server_process, redis_server)
    proxy = start_nginx(tmp_path, ca, nodes, client_tls)
    proxies.append(proxy)
    assert_modern_tls(proxy.port, ca)


# -- client address: X-Forwarded-For only from a trusted proxy ------------------------------


@contextlib.asynccontextmanager
async def _connected(url: str, headers: list[tuple[str, str]]) -> AsyncIterator[str]:
    async with Client.connect(url, make_token("carol"), how="header",
                              additional_headers=headers) as client:
        assert client.welcome is not None
        yield str(client.welcome["client"])


def _logged_address(node: ServerProcess, client_id: str) -> str:
    def find() -> str | None:
        match = re.search(rf"client {re.escape(client_id)} authenticated as 'carol' "
                          rf"from (\S+)", node.stderr)
        return match.group(1) if match else None

    return str(wait_for(find, f"the auth log line of {client_id}", timeout=WAIT))


@pytest.mark.parametrize(("trusted", "forwarded", "expected"), [
    (None, "203.0.113.9", "127.0.0.1"),
    ("127.0.0.1", "203.0.113.9", "203.0.113.9"),
    ("127.0.0.0/8", "198.51.100.7, 203.0.113.9", "203.0.113.9"),
    ("127.0.0.1", "203.0.113.9, 127.0.0.1", "203.0.113.9"),
    ("10.0.0.0/8", "203.0.113.9", "127.0.0.1"),
])
async def test_logged_client_address_uses_forwarded_for_only_from_trusted_peers(
    server_process: Callable[..., ServerProcess], trusted: str | None, forwarded: str,
    expected: str,
) -> None:
    args = ["--jwt-secret", SECRET, "--log-level", "debug"]
    if trusted:
        args += ["--trusted-proxies", trusted]
    node = server_process(*args)
    async with _connected(node.url, [("X-Forwarded-For", forwarded)]) as client_id:
        assert await asyncio.to_thread(_logged_address, node, client_id) == expected


def test_repeated_forwarded_for_lines_are_one_list(
    server_process: Callable[..., ServerProcess],
) -> None:
    """Two proxies in a row (a CDN, then HAProxy with `option forwardfor`) send two
    X-Forwarded-For lines; HTTP says they mean one comma-separated list."""
    node = server_process("--jwt-secret", SECRET, "--log-level", "debug",
                          "--trusted-proxies", "127.0.0.1")
    request = ("GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n"
               f"Authorization: Bearer {make_token('carol')}\r\n"
               "X-Forwarded-For: 198.51.100.7\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n")
    with socket.create_connection(("127.0.0.1", node.port), timeout=WAIT) as sock:
        sock.sendall(request.encode())
        received = b""
        with contextlib.suppress(TimeoutError):
            while b"welcome" not in received and b"\r\n\r\n\x88" not in received:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                received += chunk
    head, _, frames = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    assert frames[:1] == b"\x81" and b'"welcome"' in frames, frames  # not a close frame
    client_id = orjson.loads(frames[frames.index(b"{"):frames.index(b"}") + 1])["client"]
    assert _logged_address(node, client_id) == "203.0.113.9"


def test_readme_try_it_steps_through_haproxy(
    tmp_path: Path, redis_server: RedisServer,
    server_process: Callable[..., ServerProcess], proxies: list[Proxy],
) -> None:
    """deploy/README.md's steps: make-certs.sh's certificate in HAProxy, then
    `wsbroker token`, `wsbroker listen wss://localhost…` trusting ca.crt through
    SSL_CERT_FILE, and a backend's `wsbroker publish` through Redis."""
    haproxy_binary()
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    certs = tmp_path / "certs"
    subprocess.run(["sh", str(DEPLOY / "make-certs.sh"), str(certs)], check=True,
                   capture_output=True, timeout=60)
    nodes = start_fleet(server_process, redis_server)
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    proxy, _ = start_haproxy(tmp_path, certs / "haproxy.pem", nodes, context)
    proxies.append(proxy)

    env = {**os.environ, "WSB_JWT_SECRET": SECRET, "SSL_CERT_FILE": str(certs / "ca.crt")}
    wsbroker = [sys.executable, "-m", "wsbroker"]
    token = subprocess.run([*wsbroker, "token", "--sub", "demo", "--channels", "news.>"],
                           env=env, capture_output=True, text=True, timeout=30, check=True)
    env["WSB_TOKEN"] = token.stdout.strip()
    listen_out = tmp_path / "listen.out"
    with open(listen_out, "wb") as out:
        listener = subprocess.Popen(
            [*wsbroker, "listen", f"wss://localhost:{proxy.port}/ws", CHANNEL, "--count", "1"],
            env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        def subscribed() -> bool:
            assert listener.poll() is None, listen_out.read_text()
            with redis_server.client() as conn:
                return bool(conn.pubsub_numsub(f"ws:{CHANNEL}")[0][1])

        wait_for(subscribed, "`wsbroker listen` to subscribe")
        subprocess.run([*wsbroker, "publish", CHANNEL, '{"hello": "world"}',
                        "--redis-url", redis_server.url], env=env, check=True,
                       capture_output=True, timeout=30)
        assert listener.wait(BOUND) == 0, listen_out.read_text()
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait(WAIT)
    (line,) = listen_out.read_text().splitlines()
    assert orjson.loads(line)["data"] == {"hello": "world"}


# -- what the proxies log and expose ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["haproxy", "nginx"])
async def test_proxy_access_logs_carry_no_token_and_metrics_stay_inside(
    kind: str, tmp_path: Path, ca: trustme.CA, client_tls: ssl.SSLContext,
    redis_server: RedisServer, server_process: Callable[..., ServerProcess],
    proxies: list[Proxy],
) -> None:
    """Browsers put their token in the URL (`/ws?token=…`): the proxy's access log shows
    the request without its query. `/metrics` answers 404 through the proxy (Prometheus
    scrapes the nodes from inside), while each node still serves it."""
    nodes = start_fleet(server_process, redis_server)
    if kind == "haproxy":
        haproxy_binary()
        pem = tmp_path / "haproxy.pem"
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(pem)
        proxy, _ = start_haproxy(tmp_path, pem, nodes, client_tls)
        log_file = proxy.log
    else:
        nginx_binary()
        proxy = start_nginx(tmp_path, ca, nodes, client_tls)
        log_file = tmp_path / "access.log"
    proxies.append(proxy)
    base = f"127.0.0.1:{proxy.port}"
    tokens = [make_token("in-query"), make_token("percent-encoded")]
    urls = [f"wss://{base}/ws?token={tokens[0]}",
            f"wss://{base}/ws?x=1&%74oken={tokens[1]}"]
    for url in urls:
        async with Client.connect(url, how="none", expect_welcome=False,
                                  ssl=client_tls) as client:
            assert (await client.receive())["type"] == "welcome"

    for path in ("/metrics", "/metrics?format=text", "/Metrics", "/metrics/"):
        status = await asyncio.to_thread(https_get, f"https://{base}{path}", client_tls)
        assert status == 404, (path, status)
    for node in nodes.values():
        status, _, body = await asyncio.to_thread(http_get, node.http + "/metrics")
        assert status == 200 and "wsbroker_connections" in body

    def logged_upgrades() -> bool:
        proxy.check_running()
        return log_file.read_text(errors="replace").count("GET /ws ") >= len(urls)

    await asyncio.to_thread(wait_for, logged_upgrades, f"{kind} to log both upgrades")
    text = log_file.read_text(errors="replace")
    for token in tokens:
        for part in token.split("."):
            assert part not in text, f"{kind} logged part of a token: {part[:12]}…"
    assert "token" not in text and "%74oken" not in text, text
