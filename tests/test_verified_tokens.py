"""The verified-token memory: reconnects skip the signature check, never the rules."""

from __future__ import annotations

import asyncio
import time

import pytest
from websockets.exceptions import InvalidStatus

from tests.conftest import NodeFactory, ws_url
from tests.helpers import SECRET, Client, make_token
from wsbroker.auth import Identity, VerifiedTokens, Verifier
from wsbroker.channels import PatternSet
from wsbroker.config import Settings


def identity(expires: float) -> Identity:
    return Identity("u", expires, PatternSet(()), PatternSet(()))


def test_entries_expire_with_their_token() -> None:
    memory = VerifiedTokens(leeway=0)
    memory.put("live", identity(time.time() + 60))
    memory.put("dead", identity(time.time() - 1))
    assert memory.get("live") is not None
    assert memory.get("dead") is None
    assert memory.get("never-seen") is None


def test_capacity_is_bounded_oldest_out() -> None:
    memory = VerifiedTokens(leeway=0, capacity=2)
    for name in ("a", "b", "c"):
        memory.put(name, identity(time.time() + 60))
    assert memory.get("a") is None
    assert memory.get("b") is not None and memory.get("c") is not None


async def test_a_remembered_token_is_still_refused_once_expired(start_node: NodeFactory) -> None:
    node = await start_node(jwt_leeway=0)
    token = make_token(ttl=1.5)
    async with Client.connect(ws_url(node), token) as client:
        assert client.welcome is not None
    async with Client.connect(ws_url(node), token) as again:  # served from memory
        assert again.welcome is not None
    await asyncio.sleep(max(0.0, client.welcome["expires"] - time.time()) + 0.1)  # let it lapse
    with pytest.raises(InvalidStatus) as refused:
        async with Client.connect(ws_url(node), token):
            pass
    assert refused.value.response.status_code == 401


async def test_only_successes_are_remembered() -> None:
    verifier = Verifier(Settings(jwt_secret=SECRET))
    forged = make_token(secret="another-secret-of-a-reasonable-length-000")
    for _ in range(2):
        with pytest.raises(Exception, match="signature"):
            await verifier.verify(forged)
