"""Webhook signatures (SPEC §13): Standard Webhooks, checked by an independent
verifier written here and by ``wsbroker.webhooks.verify``."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping

import pytest

from tests.conftest import NodeFactory, ws_url
from tests.helpers import Client, make_token
from tests.webhook_receiver import Received, Receiver
from wsbroker.webhooks import WebhookVerificationError, verify

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"o" * 32).decode()


def standard_webhooks_signatures(secret: str, headers: Mapping[str, str], body: bytes) -> int:
    """How many ``v1`` entries of the request match ``secret``: the Standard Webhooks
    recipe, written from the specification, sharing no code with wsbroker."""
    key = base64.b64decode(secret.split("_", 1)[1])
    content = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
    entries = [entry.split(",", 1) for entry in headers["webhook-signature"].split(" ")]
    return sum(1 for version, value in entries if version == "v1" and value == expected)


def forge(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Headers signed by the independent recipe, for requests the node never sent."""
    key = base64.b64decode(secret.split("_", 1)[1])
    content = f"{msg_id}.{timestamp}.".encode() + body
    digest = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": f"v1,{digest}"}


async def occupied_request(
    start_node: NodeFactory, receiver: Receiver, *secrets: str
) -> Received:
    node = await start_node(webhook_url=receiver.url, webhook_secret=secrets)
    async with Client.connect(ws_url(node), make_token()) as client:
        await client.subscribe("room.1")
        return await receiver.next_request()


async def test_a_standard_webhooks_verifier_accepts_the_request(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    request = await occupied_request(start_node, receiver, SECRET)
    assert standard_webhooks_signatures(SECRET, request.headers, request.body) == 1
    assert request.headers["content-type"] == "application/json"
    assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 5
    [event] = request.events
    assert event["type"] == "channel_occupied" and event["channel"] == "room.1"
    assert abs(event["time_ms"] / 1000 - time.time()) < 5


async def test_verify_accepts_what_the_node_sent(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    request = await occupied_request(start_node, receiver, SECRET)
    verify(SECRET, request.headers, request.body)  # raises if refused
    verify(SECRET, {k.title(): v for k, v in request.headers.items()}, request.body.decode())


async def test_two_secrets_give_two_signatures_each_accepted(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    request = await occupied_request(start_node, receiver, SECRET, OTHER_SECRET)
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    assert standard_webhooks_signatures(SECRET, request.headers, request.body) == 1
    assert standard_webhooks_signatures(OTHER_SECRET, request.headers, request.body) == 1
    verify(OTHER_SECRET, request.headers, request.body)


async def test_verify_refuses_a_tampered_body(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    request = await occupied_request(start_node, receiver, SECRET)
    tampered = request.body.replace(b"room.1", b"room.2")
    with pytest.raises(WebhookVerificationError, match="signature"):
        verify(SECRET, request.headers, tampered)


async def test_verify_refuses_a_wrong_secret(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    request = await occupied_request(start_node, receiver, SECRET)
    with pytest.raises(WebhookVerificationError, match="signature"):
        verify(OTHER_SECRET, request.headers, request.body)


def test_verify_refuses_an_old_timestamp_even_correctly_signed() -> None:
    body = b'{"time_ms":1,"events":[]}'
    old = int(time.time()) - 600
    headers = forge(SECRET, "msg_replayed", old, body)
    assert standard_webhooks_signatures(SECRET, headers, body) == 1
    with pytest.raises(WebhookVerificationError, match="timestamp"):
        verify(SECRET, headers, body)
    verify(SECRET, headers, body, tolerance=900)  # the tolerance is the only reason


def test_verify_refuses_missing_headers_and_bad_secrets() -> None:
    body = b"{}"
    headers = forge(SECRET, "msg_1", int(time.time()), body)
    del headers["webhook-signature"]
    with pytest.raises(WebhookVerificationError, match="webhook-signature"):
        verify(SECRET, headers, body)
    with pytest.raises(WebhookVerificationError, match="whsec_"):
        verify("not-a-secret", forge(SECRET, "msg_1", int(time.time()), body), body)

