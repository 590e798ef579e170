"""The servers under test: how to start each one and how a client reaches it.

wsbroker runs with every per-client limit that would distort a load test turned
off (``--rate-limit 0 --max-connections 0``) and quiet logs; the load generator
authenticates with one HS256 token (``channels: [">"]``) minted here with pyjwt,
exactly what a backend would do. The floor ignores the token.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jwt

from benchmarks import processes

SERVER_CPU = 0
KNOWN = ("wsbroker", "floor", "node", "history")
NODE_PEER = processes.REPO / "benchmarks" / "node_peer"
HISTORY_SIZE = 1000
"""``--history`` SIZE of the ``history`` server: every channel keeps this many messages."""


@dataclass(frozen=True)
class Target:
    """A running server under test and the request path a client uses."""

    name: str
    managed: processes.Managed
    port: int
    path: str
    secret: str


def mint_token(secret: str, ttl: float = 3600.0) -> str:
    """An HS256 JWT allowed to subscribe to every channel."""
    claims = {"sub": "bench", "exp": int(time.time() + ttl), "channels": [">"]}
    return jwt.encode(claims, secret, algorithm="HS256")


def _wsbroker_cmd(port: int, redis_port: int, secret: str) -> list[str]:
    return [
        processes.PYTHON,
        "-m",
        "wsbroker",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--redis-url",
        f"redis://127.0.0.1:{redis_port}",
        f"--jwt-secret={secret}",  # a secret may start with "-"
        "--rate-limit",
        "0",
        "--max-connections",
        "0",
        "--log-level",
        "warning",
    ]


def _history_cmd(port: int, redis_port: int, secret: str) -> list[str]:
    """wsbroker with every channel a history channel: the publisher FCALLs wsb_publish."""
    return [*_wsbroker_cmd(port, redis_port, secret), "--history", f">={HISTORY_SIZE}"]


def _floor_cmd(port: int, redis_port: int, secret: str) -> list[str]:
    return [
        processes.PYTHON,
        "-m",
        "benchmarks.floor_server",
        "--port",
        str(port),
        "--redis-url",
        f"redis://127.0.0.1:{redis_port}",
    ]


def _node_cmd(port: int, redis_port: int, secret: str) -> list[str]:
    _install_node_peer()
    return [
        "node",
        str(NODE_PEER / "server.mjs"),
        "--port",
        str(port),
        "--redis-url",
        f"redis://127.0.0.1:{redis_port}",
        "--secret",
        secret,
    ]


def _install_node_peer() -> None:
    """``npm ci`` the peer's pinned packages (ws, ioredis, jsonwebtoken) once."""
    if (NODE_PEER / "node_modules" / "ws").is_dir():
        return
    if shutil.which("npm") is None:
        raise RuntimeError("the node peer needs Node.js and npm on the PATH")
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--prefix", str(NODE_PEER)],
                   check=True, stdout=subprocess.DEVNULL)


def node_peer_versions() -> dict[str, str]:
    """Node.js and the peer's package versions, recorded with the results."""
    versions = {"node": subprocess.run(["node", "--version"], capture_output=True,
                                       text=True, check=False).stdout.strip()}
    for package in ("ws", "ioredis", "jsonwebtoken"):
        manifest = NODE_PEER / "node_modules" / package / "package.json"
        if manifest.is_file():
            versions[package] = json.loads(manifest.read_text())["version"]
    return versions


COMMANDS: dict[str, Callable[[int, int, str], list[str]]] = {
    "wsbroker": _wsbroker_cmd,
    "floor": _floor_cmd,
    "history": _history_cmd,
    "node": _node_cmd,
}


def start_server(name: str, redis_port: int, logdir: Path) -> Target:
    """Start ``name`` on core 0 and wait until it accepts connections."""
    port = processes.free_port()
    secret = secrets.token_urlsafe(32)
    # WSB_* variables in the caller's shell would silently change the configuration.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSB_")}
    cmd = COMMANDS[name](port, redis_port, secret)
    managed = processes.start(name, cmd, SERVER_CPU, logdir, env)
    try:
        processes.wait_port(port, 20, managed.proc)
    except Exception as exc:
        tail = managed.log_tail()
        managed.stop()
        raise RuntimeError(f"{name} did not start: {exc}\n{tail}") from exc
    return Target(name, managed, port, f"/ws?token={mint_token(secret)}", secret)
