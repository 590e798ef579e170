"""The receiver examples in docs/webhooks.md, run for real against a node:
the Python one (with ``wsbroker.webhooks.verify``) and the Node.js one."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import NodeFactory, ws_url
from tests.helpers import Client, eventually, free_port, make_token

DOCS = Path(__file__).resolve().parent.parent / "docs" / "webhooks.md"
SECRET = "whsec_" + base64.b64encode(b"x" * 32).decode()


def code_block(language: str, containing: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", DOCS.read_text(), re.S)
    return next(block for block in blocks if containing in block)


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(params=["python", "node"])
def example_receiver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[
        subprocess.Popen[str], int]]:
    """The docs' receiver, running as its own process on a free port."""
    if request.param == "python":
        source, command = code_block("python", "serve_forever"), [sys.executable]
        path = tmp_path / "receiver.py"
    else:
        node = shutil.which("node")
        if node is None:
            pytest.skip("Node.js is not installed")
        source, command = code_block("js", "createServer"), [node]
        path = tmp_path / "receiver.mjs"
    path.write_text(source)
    port = free_port()
    env = {**os.environ, "WEBHOOK_SECRET": SECRET, "PORT": str(port),
           "PYTHONPATH": str(DOCS.parent.parent)}
    process = subprocess.Popen([*command, str(path)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    yield process, port
    process.terminate()
    process.wait(10)
    assert process.stdout is not None
    process.stdout.close()


async def test_the_documented_receiver_accepts_the_node_and_refuses_a_forgery(
    example_receiver: tuple[subprocess.Popen[str], int], start_node: NodeFactory
) -> None:
    process, port = example_receiver
    await eventually(lambda: listening(port), timeout=10)
    node = await start_node(webhook_url=f"http://127.0.0.1:{port}/",
                            webhook_secret=(SECRET,))
    async with Client.connect(ws_url(node), make_token()) as client:
        await client.subscribe("room.1")
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 5)
    assert line.split() == ["channel_occupied", "room.1"]
    forged = urllib.request.Request(
        f"http://127.0.0.1:{port}/", data=b'{"events":[]}', method="POST",
        headers={"webhook-id": "msg_1", "webhook-timestamp": "1",
                 "webhook-signature": "v1,AAAA"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        await asyncio.to_thread(urllib.request.urlopen, forged, timeout=5)
    assert refused.value.code == 401
