"""Shared fixtures: in-process nodes on free ports, real server processes."""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.helpers import SECRET, ServerProcess
from wsbroker.config import Settings
from wsbroker.server import Node

pytest_plugins = ["tests.redis_server", "tests.redis_cluster", "tests.webhook_receiver",
                  "tests.browser_client_harness"]

NodeFactory = Callable[..., Awaitable[Node]]


def node_settings(**overrides: Any) -> Settings:
    """Test defaults: loopback, a free port, a known secret, short drains."""
    base = Settings(host="127.0.0.1", port=0, jwt_secret=SECRET, node_id="test-node",
                    drain_seconds=0.5)
    return dataclasses.replace(base, **overrides)


@pytest.fixture
async def start_node() -> AsyncIterator[NodeFactory]:
    """Start in-process nodes with Settings overrides; all are stopped afterwards."""
    nodes: list[Node] = []

    async def start(**overrides: Any) -> Node:
        node = Node(node_settings(**overrides))
        await node.start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        await node.stop()


@pytest.fixture
async def node(start_node: NodeFactory) -> Node:
    """A node with default limits on the in-process backplane."""
    return await start_node()


def ws_url(node: Node) -> str:
    return f"ws://127.0.0.1:{node.port}/ws"


def http_url(node: Node) -> str:
    return f"http://127.0.0.1:{node.port}"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """A throwaway certificate authority for TLS tests."""
    return trustme.CA()


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    """A client TLS context that trusts :func:`ca`."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start real ``wsbroker serve`` processes; each is ended (SIGTERM) afterwards."""
    started: list[ServerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, wait_ready: bool = True,
              port: int | None = None) -> ServerProcess:
        server = ServerProcess(*args, env=env, tmp=tmp_path, port=port)
        started.append(server)
        return server.start(wait_ready=wait_ready)

    yield start
    for server in started:
        server.stop()
