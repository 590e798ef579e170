"""Authentication and permissions as a client sees them (SPEC §2, §3, §9 metrics).

Every test runs a real in-process node and talks to it over real WebSockets.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Response

from tests.conftest import NodeFactory, http_url, ws_url
from tests.helpers import SECRET, Client, http_get, make_token
from wsbroker.channels import PatternSet
from wsbroker.server import Node

CLOSE_UNAUTHORIZED = 4001

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


# -- helpers -------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_claims(claims: dict[str, Any], *, secret: str = SECRET, ttl: float = 3600) -> str:
    """An HS256 token with exactly ``claims`` (plus ``exp`` unless given)."""
    return jwt.encode({"exp": int(time.time() + ttl), **claims}, secret, algorithm="HS256")


def hand_made_token(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> str:
    """A JWT built without pyjwt: HMAC-SHA256 over it with ``secret``, or no signature."""
    signing_input = f"{b64url(orjson.dumps(header))}.{b64url(orjson.dumps(claims))}"
    if secret is None:
        return signing_input + "."
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


async def refused(url: str, token: str, how: str = "query") -> Response:
    """The HTTP response of an upgrade the node must refuse."""
    with pytest.raises(InvalidStatus) as info:
        async with Client.connect(url, token, how=how):
            pass
    return info.value.response


def assert_plain_401(response: Response) -> str:
    """A 401 with a one-line text/plain reason; returns that reason."""
    assert response.status_code == 401
    assert response.headers["Content-Type"].startswith("text/plain")
    reason = response.body.decode()
    assert reason.strip(), "the 401 must say why"
    assert "\n" not in reason.strip(), reason
    return reason.strip()


async def metrics_text(node: Node) -> str:
    status, _, body = await asyncio.to_thread(http_get, http_url(node) + "/metrics")
    assert status == 200
    return body


def exp_in(seconds: float) -> int:
    """An integer ``exp`` at least ``seconds`` from now (and less than one more)."""
    return math.ceil(time.time()) + math.ceil(seconds)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[PrivateKey, Path]]:
    """RSA, P-256 and Ed25519 key pairs; the public halves written as PEM files."""
    directory = tmp_path_factory.mktemp("keys")
    pairs: dict[str, PrivateKey] = {
        algorithm: new_private_key(algorithm) for algorithm in ("RS256", "ES256", "EdDSA")
    }
    result = {}
    for algorithm, private in pairs.items():
        path = directory / f"{algorithm}.pem"
        path.write_bytes(private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        result[algorithm] = (private, path)
    return result


def new_private_key(algorithm: str) -> PrivateKey:
    if algorithm == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


async def public_key_node(start_node: NodeFactory, path: Path,
                          algorithms: Sequence[str]) -> Node:
    return await start_node(jwt_secret=None, jwt_public_key=str(path),
                            jwt_algorithms=tuple(algorithms))


# -- the three ways to authenticate ----------------------------------------------------


@pytest.mark.parametrize("how", ["header", "query"])
async def test_handshake_token_gets_welcome_first(node: Node, how: str) -> None:
    """A valid token in the Authorization header or ?token= gives a welcome as first frame."""
    token = make_token("alice", ttl=600)
    expires = jwt.decode(token, SECRET, algorithms=["HS256"])["exp"]
    async with Client.connect(ws_url(node), token, how=how) as client:
        welcome = client.welcome
        assert welcome is not None
        assert welcome["user"] == "alice"
        assert welcome["node"] == "test-node"
        assert welcome["expires"] == expires
        assert isinstance(welcome["client"], str) and welcome["client"]
        assert "id" not in welcome
        assert (await client.request("ping"))["type"] == "ok"


async def test_first_message_auth_welcome_carries_id_and_is_only_reply(node: Node) -> None:
    """First-message auth: the welcome echoes the op id and no separate ok follows."""
    async with Client.connect(ws_url(node), how="none") as client:
        await client.send({"op": "auth", "token": make_token("carol"), "id": "a1"})
        welcome = await client.receive()
        assert welcome["type"] == "welcome"
        assert welcome["id"] == "a1"
        assert welcome["user"] == "carol"
        await client.send({"op": "ping", "id": 99})
        assert await client.receive() == {"type": "ok", "id": 99}


async def test_first_message_auth_without_id_has_no_id(node: Node) -> None:
    """A first auth op without id gets a welcome without id."""
    async with Client.connect(ws_url(node), make_token("dan"), how="message") as client:
        assert client.welcome is not None
        assert "id" not in client.welcome
        assert client.welcome["user"] == "dan"


# -- refused handshakes: HTTP 401 -----------------------------------------------------------


def _bad_tokens() -> dict[str, str]:
    now = int(time.time())
    return {
        "bad signature": make_token(secret="not-the-node-secret-0123456789abcdef"),
        "expired beyond leeway": make_token(ttl=-60),
        "not valid before an hour": make_token(nbf=now + 3600),
        "alg none": hand_made_token({"alg": "none", "typ": "JWT"},
                                    {"sub": "alice", "exp": now + 600, "channels": [">"]}, None),
        "missing sub": make_token(sub=None),
        "empty sub": make_token(sub=""),
        "non-string sub": sign_claims({"sub": 42}),
        "missing exp": jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"),
        "channels not a list": sign_claims({"sub": "alice", "channels": "prices.*"}),
        "channels with a non-string": sign_claims({"sub": "alice", "channels": [1]}),
        "invalid publish pattern": sign_claims({"sub": "alice", "publish": ["a..b"]}),
        "misplaced > in publish": sign_claims({"sub": "alice", "publish": ["a.>.b"]}),
        "not a JWT": "this-is-not-a-jwt",
        "issued in an hour": make_token(iat=now + 3600),
        "exp not a number": sign_claims({"sub": "alice", "exp": "tomorrow"}),
        "payload not an object": hand_made_token(
            {"alg": "HS256", "typ": "JWT"}, ["sub", "alice"], SECRET.encode()),  # type: ignore[arg-type]
    }


@pytest.mark.parametrize("how", ["query", "header"])
@pytest.mark.parametrize("case", list(_bad_tokens()))
async def test_bad_handshake_token_is_refused_with_401(node: Node, case: str, how: str) -> None:
    """A handshake token that fails verification → HTTP 401, text/plain, one-line reason."""
    response = await refused(ws_url(node), _bad_tokens()[case], how=how)
    assert_plain_401(response)


async def test_401_reasons_say_what_is_wrong(node: Node) -> None:
    """The 401 reason names the problem (expired, signature, sub) without echoing the token."""
    url = ws_url(node)
    expired = make_token(ttl=-60)
    reason = assert_plain_401(await refused(url, expired))
    assert "expired" in reason
    assert expired not in reason
    reason = assert_plain_401(await refused(url, make_token(secret="x" * 40)))
    assert "signature" in reason
    reason = assert_plain_401(await refused(url, make_token(sub=None)))
    assert "sub" in reason


async def test_expired_within_leeway_is_accepted_then_closed(start_node: NodeFactory) -> None:
    """A token expired less than --jwt-leeway ago is accepted; closed 4001 when leeway ends."""
    node = await start_node(jwt_leeway=2.0)
    token = make_token(ttl=-0.5)
    started = time.monotonic()
    async with Client.connect(ws_url(node), token) as client:
        code, _ = await client.closed(timeout=5)
    assert code == CLOSE_UNAUTHORIZED
    assert time.monotonic() - started < 4


@pytest.mark.parametrize("algorithms", [("RS256",), ("RS256", "HS256")])
async def test_algorithm_confusion_hs256_signed_with_public_key_refused(
    start_node: NodeFactory, keys: dict[str, tuple[PrivateKey, Path]],
    algorithms: tuple[str, ...],
) -> None:
    """An HS256 token whose HMAC secret is the node's PEM public key is refused (401)."""
    _, pem_path = keys["RS256"]
    node = await public_key_node(start_node, pem_path, algorithms)
    forged = hand_made_token({"alg": "HS256", "typ": "JWT"},
                             {"sub": "mallory", "exp": int(time.time()) + 600,
                              "channels": [">"], "publish": [">"]},
                             pem_path.read_bytes())
    assert_plain_401(await refused(ws_url(node), forged))
    assert_plain_401(await refused(ws_url(node), forged, how="header"))
    async with Client.connect(ws_url(node), forged, how="message",
                              expect_welcome=False) as client:
        assert (await client.closed())[0] == CLOSE_UNAUTHORIZED


# -- public keys from PEM files ----------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["RS256", "ES256", "EdDSA"])
async def test_public_key_pem_accepts_its_tokens_and_refuses_others(
    start_node: NodeFactory, keys: dict[str, tuple[PrivateKey, Path]], algorithm: str,
) -> None:
    """With --jwt-public-key, tokens signed by the matching private key are accepted;
    tokens from another key of the same kind get 401."""
    private, pem_path = keys[algorithm]
    node = await public_key_node(start_node, pem_path, [algorithm])
    token = make_token("erin", algorithm=algorithm, key=private)
    async with Client.connect(ws_url(node), token, how="header") as client:
        assert client.welcome is not None and client.welcome["user"] == "erin"
        assert (await client.subscribe("any.channel"))["channel"] == "any.channel"
    other = new_private_key(algorithm)
    reason = assert_plain_401(await refused(
        ws_url(node), make_token("erin", algorithm=algorithm, key=other)))
    assert "signature" in reason


async def test_token_of_other_key_family_is_refused_not_crashing(
    start_node: NodeFactory, keys: dict[str, tuple[PrivateKey, Path]],
) -> None:
    """An RS256 token presented to a node holding an EC public key (both algorithms
    allowed) gets a plain 401, and the node keeps serving."""
    ec_private, ec_path = keys["ES256"]
    rsa_private, _ = keys["RS256"]
    node = await public_key_node(start_node, ec_path, ["RS256", "ES256"])
    assert_plain_401(await refused(ws_url(node), make_token(algorithm="RS256", key=rsa_private)))
    async with Client.connect(ws_url(node), make_token(algorithm="ES256", key=ec_private)):
        pass


async def test_only_allowed_hmac_algorithms_are_accepted(start_node: NodeFactory) -> None:
    """By default only HS256 verifies; HS512 with the right secret is accepted only when
    --jwt-algorithms lists it."""
    secret = "a-sixty-four-byte-secret-for-hs512-" + "0123456789" * 3
    hs512 = make_token("alice", algorithm="HS512", secret=secret)
    default = await start_node(jwt_secret=secret)
    reason = assert_plain_401(await refused(ws_url(default), hs512))
    assert "HS512" in reason
    widened = await start_node(jwt_secret=secret, jwt_algorithms=("HS256", "HS512"))
    async with Client.connect(ws_url(widened), hs512) as client:
        assert client.welcome is not None and client.welcome["user"] == "alice"


# -- audience and issuer ------------------------------------------------------------------


async def test_audience_and_issuer_checked_only_when_configured(
    start_node: NodeFactory,
) -> None:
    """With --jwt-audience/--jwt-issuer set, tokens must carry matching claims;
    without them, tokens carrying any aud/iss are accepted."""
    strict = await start_node(jwt_audience="wsbroker", jwt_issuer="https://idp.test")
    url = ws_url(strict)
    good = make_token(aud="wsbroker", iss="https://idp.test")
    async with Client.connect(url, good):
        pass
    for bad in (make_token(iss="https://idp.test"),
                make_token(aud="other-app", iss="https://idp.test"),
                make_token(aud="wsbroker"),
                make_token(aud="wsbroker", iss="https://evil.test")):
        assert_plain_401(await refused(url, bad))
    lax = await start_node()
    async with Client.connect(ws_url(lax), make_token(aud="anything", iss="whoever")) as c:
        assert c.welcome is not None and c.welcome["user"] == "alice"


async def test_audience_may_be_a_list_containing_ours(start_node: NodeFactory) -> None:
    """RFC 7519: `aud` may list several audiences; ours among them is enough."""
    node = await start_node(jwt_audience="wsbroker")
    async with Client.connect(ws_url(node), make_token(aud=["billing", "wsbroker"])):
        pass
    assert_plain_401(await refused(ws_url(node), make_token(aud=["billing", "other"])))


# -- close 4001 -----------------------------------------------------------------------------


async def test_no_auth_within_timeout_closes_4001(start_node: NodeFactory) -> None:
    """No token at the handshake and no auth op within --auth-timeout → close 4001."""
    node = await start_node(auth_timeout=0.3)
    started = time.monotonic()
    async with Client.connect(ws_url(node), how="none") as client:
        code, _ = await client.closed(timeout=3)
    assert code == CLOSE_UNAUTHORIZED
    assert 0.25 <= time.monotonic() - started < 3


@pytest.mark.parametrize("frame", [
    {"op": "ping", "id": 1},
    {"op": "subscribe", "id": 1, "channel": "a"},
    {"op": "auth", "id": 1},
    "not json",
])
async def test_other_first_frame_closes_4001(node: Node, frame: dict[str, Any] | str) -> None:
    """Anything but a well-formed auth op as first frame → close 4001, no reply."""
    async with Client.connect(ws_url(node), how="none") as client:
        await client.send(frame)
        with pytest.raises(ConnectionClosed):
            frame_received = await client.receive()
            pytest.fail(f"expected a close, got {frame_received}")
        assert (await client.closed())[0] == CLOSE_UNAUTHORIZED


@pytest.mark.parametrize("case", ["bad signature", "expired beyond leeway", "alg none",
                                  "channels not a list", "missing sub"])
async def test_bad_first_message_token_closes_4001(node: Node, case: str) -> None:
    """A first-message auth whose token fails verification → close 4001, no welcome."""
    async with Client.connect(ws_url(node), how="none") as client:
        await client.send({"op": "auth", "id": 1, "token": _bad_tokens()[case]})
        code, reason = await client.closed()
    assert code == CLOSE_UNAUTHORIZED
    assert reason


async def test_bad_first_message_token_with_long_non_ascii_reason_closes_4001(
    node: Node,
) -> None:
    """Even when the refusal reason is long and non-ASCII (a bad pattern in the token),
    the client gets close 4001 — not 1011 — so it knows to fetch a fresh token."""
    token = sign_claims({"sub": "alice", "channels": ["é" * 80]})
    async with Client.connect(ws_url(node), how="none") as client:
        await client.send({"op": "auth", "token": token})
        code, _ = await client.closed()
    assert code == CLOSE_UNAUTHORIZED


async def test_token_expiry_while_connected_closes_4001(start_node: NodeFactory) -> None:
    """When exp (+ leeway 0) passes with no refresh, the node closes with 4001."""
    node = await start_node(jwt_leeway=0.0)
    exp = exp_in(1)
    token = sign_claims({"sub": "alice", "channels": [">"], "exp": exp})
    async with Client.connect(ws_url(node), token) as client:
        assert client.welcome is not None and client.welcome["expires"] == exp
        code, reason = await client.closed(timeout=exp - time.time() + 2)
    assert code == CLOSE_UNAUTHORIZED
    assert "expired" in reason
    assert time.time() >= exp - 0.05


# -- refresh ------------------------------------------------------------------------------------


async def test_refresh_same_sub_extends_the_connection(start_node: NodeFactory) -> None:
    """auth op with a new token of the same sub → ok with the new expires; the
    connection outlives the first token."""
    node = await start_node(jwt_leeway=0.0)
    first_exp = exp_in(1)
    first = sign_claims({"sub": "alice", "channels": [">"], "exp": first_exp})
    second = make_token("alice", ttl=600)
    second_exp = jwt.decode(second, SECRET, algorithms=["HS256"])["exp"]
    async with Client.connect(ws_url(node), first) as client:
        reply = await client.request("auth", token=second)
        assert reply == {"type": "ok", "id": reply["id"], "expires": second_exp}
        await asyncio.sleep(max(first_exp - time.time(), 0) + 0.5)  # past the first exp
        assert (await client.request("ping"))["type"] == "ok"


async def test_refresh_with_other_sub_is_forbidden_and_keeps_old_credentials(
    node: Node,
) -> None:
    """A refresh token for another user → error forbidden; still connected, old rights."""
    async with Client.connect(ws_url(node), make_token("alice", channels=["a.>"])) as client:
        reply = await client.request("auth", token=make_token("bob", channels=[">"]))
        assert reply["type"] == "error" and reply["code"] == "forbidden"
        denied = await client.request("subscribe", channel="b")
        assert denied["code"] == "forbidden"
        assert (await client.subscribe("a.x"))["channel"] == "a.x"


async def test_refresh_with_invalid_token_is_unauthorized_and_keeps_old_credentials(
    node: Node,
) -> None:
    """A refresh token that fails verification → error unauthorized; still connected."""
    async with Client.connect(ws_url(node), make_token("alice", channels=["a.>"])) as client:
        for bad in (make_token("alice", channels=[">"], secret="y" * 40),
                    make_token("alice", channels=[">"], ttl=-60),
                    "garbage"):
            reply = await client.request("auth", token=bad)
            assert reply["type"] == "error" and reply["code"] == "unauthorized", reply
        assert (await client.request("subscribe", channel="b"))["code"] == "forbidden"
        assert (await client.request("ping"))["type"] == "ok"


async def test_refresh_drops_subscriptions_no_longer_allowed(node: Node) -> None:
    """A refresh whose channels no longer allow a subscription → unsubscribed push
    (reason forbidden), and that channel's messages stop; others keep flowing."""
    url = ws_url(node)
    publisher_token = make_token("pub", publish=[">"])
    async with Client.connect(url, make_token("alice", channels=[">"])) as client, \
            Client.connect(url, publisher_token) as publisher:
        await client.subscribe("news.x")
        await client.subscribe("sports.y")
        reply = await client.request("auth", token=make_token("alice", channels=["sports.>"]))
        assert reply["type"] == "ok" and "expires" in reply
        assert await client.receive() == {
            "type": "unsubscribed", "channel": "news.x", "reason": "forbidden"}
        await publisher.request("publish", channel="news.x", data="hidden")
        await publisher.request("publish", channel="sports.y", data="visible")
        message = await client.next_message()
        assert (message["channel"], message["data"]) == ("sports.y", "visible")
        assert (await client.request("subscribe", channel="news.x"))["code"] == "forbidden"


# -- permissions end to end ----------------------------------------------------------------


async def test_channel_patterns_allow_and_forbid_subscribes(node: Node) -> None:
    """`channels: [prices.*, user.42.>]` grants exactly what the patterns match."""
    token = make_token("u42", channels=["prices.*", "user.42.>"])
    async with Client.connect(ws_url(node), token) as client:
        for channel in ("prices.AAPL", "user.42.inbox", "user.42.a.b"):
            assert (await client.request("subscribe", channel=channel))["type"] == "ok", channel
        for channel in ("prices.AAPL.bid", "prices", "user.42", "user.43.inbox", "other"):
            reply = await client.request("subscribe", channel=channel)
            assert reply["type"] == "error" and reply["code"] == "forbidden", channel


async def test_public_channels_allow_subscribe_but_not_publish(
    start_node: NodeFactory,
) -> None:
    """--public-channels lets any authenticated client subscribe (and receive), not publish."""
    node = await start_node(public_channels=PatternSet.parse(["lobby.>"]))
    url = ws_url(node)
    async with Client.connect(url, make_token("guest", channels=[])) as guest, \
            Client.connect(url, make_token("host", channels=[], publish=["lobby.>"])) as host:
        assert (await guest.subscribe("lobby.main"))["channel"] == "lobby.main"
        assert (await guest.request("subscribe", channel="private.x"))["code"] == "forbidden"
        reply = await guest.request("publish", channel="lobby.main", data=1)
        assert reply["type"] == "error" and reply["code"] == "forbidden"
        assert (await host.request("publish", channel="lobby.main", data=2))["type"] == "ok"
        message = await guest.next_message()
        assert message == {"type": "message", "channel": "lobby.main", "data": 2, "from": "host"}


async def test_publish_needs_the_publish_claim(node: Node) -> None:
    """No `publish` claim → publish forbidden; with `publish: [chat.*]` only those channels."""
    url = ws_url(node)
    async with Client.connect(url, make_token("reader", channels=[">"])) as reader, \
            Client.connect(url, make_token("writer", channels=[], publish=["chat.*"])) as writer:
        reply = await reader.request("publish", channel="chat.room", data="x")
        assert reply["type"] == "error" and reply["code"] == "forbidden"
        await reader.subscribe("chat.room")
        assert (await writer.request("publish", channel="chat.room", data="hi"))["type"] == "ok"
        reply = await writer.request("publish", channel="news.x", data="no")
        assert reply["code"] == "forbidden"
        message = await reader.next_message()
        assert (message["channel"], message["data"], message["from"]) == (
            "chat.room", "hi", "writer")


async def test_invalid_channel_is_reported_before_permissions(node: Node) -> None:
    """An invalid channel name is `invalid_channel`, even for a client forbidden everything."""
    async with Client.connect(ws_url(node), make_token("nobody", channels=[])) as client:
        for op in ("subscribe", "publish"):
            for channel in ("a..b", "prices.*", "user.>", ".a", "a."):
                fields: dict[str, Any] = {"channel": channel}
                if op == "publish":
                    fields["data"] = 1
                reply = await client.request(op, **fields)
                assert reply["type"] == "error"
                assert reply["code"] == "invalid_channel", (op, channel, reply)


async def test_auth_failures_are_counted_in_metrics(node: Node) -> None:
    """Each refused token increments wsbroker_auth_failures_total{reason=…} in /metrics."""
    url = ws_url(node)
    await refused(url, make_token(secret="z" * 40))
    await refused(url, make_token(ttl=-60))
    await refused(url, make_token(ttl=-60), how="header")
    async with Client.connect(url, how="none") as client:
        await client.send({"op": "ping"})
        await client.closed()
    text = await metrics_text(node)
    assert 'wsbroker_auth_failures_total{reason="signature"} 1.0' in text
    assert 'wsbroker_auth_failures_total{reason="expired"} 2.0' in text
    assert 'wsbroker_auth_failures_total{reason="no_auth"} 1.0' in text


async def test_an_exp_beyond_exact_json_numbers_is_refused(node: Node) -> None:
    """A signed but absurd ``exp`` (10**30) is refused, not a crashed session."""
    token = make_token(ttl=10**30)
    reason = assert_plain_401(await refused(ws_url(node), token))
    assert "exp" in reason


# -- size caps on permission claims --------------------------------------------------------


async def test_permission_claim_with_too_many_patterns_is_refused(node: Node) -> None:
    """A `channels` claim over 256 patterns is refused like any invalid token, saying why."""
    token = sign_claims({"sub": "alice", "channels": [f"c.{i}" for i in range(257)]})
    reason = assert_plain_401(await refused(ws_url(node), token, how="header"))
    assert "'channels' has 257 patterns; at most 256 are allowed" in reason
    at_cap = sign_claims({"sub": "alice", "publish": [f"c.{i}" for i in range(256)]})
    async with Client.connect(ws_url(node), at_cap, how="header") as client:
        assert (await client.request("publish", channel="c.255", data=1))["type"] == "ok"


async def test_permission_claim_with_too_much_pattern_text_is_refused(node: Node) -> None:
    """`publish` patterns totalling over 8 KiB of text are refused (first-message auth,
    since such a token is too big for a header): close 4001 with the reason."""
    token = sign_claims({"sub": "alice", "publish": [f"{i:03d}" + "x" * 247 for i in range(40)]})
    async with Client.connect(ws_url(node), how="none") as client:
        await client.send({"op": "auth", "token": token})
        code, reason = await client.closed()
    assert code == CLOSE_UNAUTHORIZED
    assert reason.startswith("token permission claims are invalid: 'publish' has 10000 char")
