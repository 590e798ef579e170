"""Native TLS: ``--tls-cert/--tls-key`` serve ``wss://`` and HTTPS on the one port.

A real ``wsbroker serve`` process with a ``trustme`` server certificate; clients
trust only the ``trustme`` CA, so a passing handshake proves the node presents
the configured chain.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme
from websockets.exceptions import InvalidMessage

from tests.helpers import SECRET, WAIT, Client, ServerProcess, make_token
from tests.test_deploy import dockerfile

BOUND = 15.0


def https_get(url: str, context: ssl.SSLContext) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=WAIT, context=context) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture
def tls_node(tmp_path: Path, ca: trustme.CA, client_tls: ssl.SSLContext,
             server_process: Callable[..., ServerProcess]) -> Iterator[ServerProcess]:
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "node.crt", tmp_path / "node.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(key)
    # Through the environment, as the container image is configured.
    node = server_process("--jwt-secret", SECRET, "--node-id", "tls-node", wait_ready=False,
                          env={"WSB_TLS_CERT": str(cert), "WSB_TLS_KEY": str(key)})
    deadline = time.monotonic() + BOUND
    while True:
        assert node.process is not None
        if node.process.poll() is not None:
            raise AssertionError(f"node exited ({node.process.returncode}):\n{node.stderr}")
        with contextlib.suppress(OSError):
            if https_get(f"https://127.0.0.1:{node.port}/healthz", client_tls)[0] == 200:
                break
        assert time.monotonic() < deadline, f"TLS node not healthy:\n{node.stderr}"
        time.sleep(0.05)
    yield node


def wss(node: ServerProcess) -> str:
    return f"wss://127.0.0.1:{node.port}/ws"


async def test_wss_client_gets_a_welcome(tls_node: ServerProcess,
                                         client_tls: ssl.SSLContext) -> None:
    async with Client.connect(wss(tls_node), make_token("alice"), how="header",
                              ssl=client_tls) as client:
        assert client.welcome is not None
        assert client.welcome["user"] == "alice" and client.welcome["node"] == "tls-node"
        await client.subscribe("prices.AAPL")
        assert (await client.request("ping"))["type"] == "ok"
    assert "listening on wss://" in tls_node.stderr


async def test_wss_first_message_auth(tls_node: ServerProcess,
                                      client_tls: ssl.SSLContext) -> None:
    async with Client.connect(wss(tls_node), make_token("bob"), how="message",
                              ssl=client_tls) as client:
        assert client.welcome is not None and client.welcome["user"] == "bob"


def test_http_routes_over_https(tls_node: ServerProcess, client_tls: ssl.SSLContext) -> None:
    base = f"https://127.0.0.1:{tls_node.port}"
    assert https_get(base + "/healthz", client_tls)[0] == 200
    assert https_get(base + "/readyz", client_tls)[0] == 200
    status, body = https_get(base + "/metrics", client_tls)
    assert status == 200 and "wsbroker_connections" in body
    assert https_get(base + "/ws", client_tls)[0] == 426


async def test_client_not_trusting_the_ca_is_refused(tls_node: ServerProcess) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        async with Client.connect(wss(tls_node), make_token(), ssl=ssl.create_default_context()):
            pass


async def test_plain_ws_to_a_tls_port_fails(tls_node: ServerProcess) -> None:
    with pytest.raises((InvalidMessage, OSError, EOFError)):
        async with Client.connect(f"ws://127.0.0.1:{tls_node.port}/ws", make_token()):
            pass


def test_tls_before_1_2_is_refused(tls_node: ServerProcess, ca: trustme.CA) -> None:
    def handshake(version: ssl.TLSVersion) -> str:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ca.configure_trust(context)
        with warnings.catch_warnings():  # TLS 1.0/1.1 are deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = context.maximum_version = version
        context.set_ciphers("ALL:@SECLEVEL=0")
        with socket.create_connection(("127.0.0.1", tls_node.port), timeout=WAIT) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.version() or ""

    assert handshake(ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
    assert handshake(ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        handshake(ssl.TLSVersion.TLSv1_1)


def test_dockerfile_healthcheck_works_with_native_tls(tls_node: ServerProcess) -> None:
    """The image's HEALTHCHECK command switches to https when WSB_TLS_CERT is set."""
    command = dockerfile().healthcheck_command
    assert command[0] == "python"
    env = {**os.environ, "WSB_PORT": str(tls_node.port)}
    env["WSB_TLS_CERT"] = tls_node.env["WSB_TLS_CERT"]
    result = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True,
                            text=True, timeout=BOUND)
    assert result.returncode == 0, result.stderr
