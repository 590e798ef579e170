"""Keys from a JWKS URL (SPEC §2): rotation, refetch rate limit, never blocking the loop.

A real JWKS endpoint (``http.server`` in a thread, loopback) serves RSA and EC
keys; in-process nodes fetch from it. The 10 s refetch limit is exercised by
advancing the clock the JWKS cache reads instead of waiting 10 s.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from websockets.exceptions import InvalidStatus

import wsbroker.auth
from tests.conftest import NodeFactory, http_url, ws_url
from tests.helpers import WAIT, Client, eventually, free_port, http_get, make_token
from wsbroker.server import Node

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
REFETCH_INTERVAL = 10.0


class Jwks:
    """A JWKS endpoint whose key set, latency and health a test controls."""

    def __init__(self) -> None:
        self.keys: dict[str, PrivateKey] = {}
        self.delay = 0.0
        self.status = 200
        self.cache_control: str | None = None
        self.extra: list[dict[str, Any]] = []  # raw JWKs served beside the keys
        self.padding = 0  # bytes of filler in the document
        self.requests = 0
        self.authorization: list[str | None] = []
        self.request_seen = threading.Event()
        self._lock = threading.Lock()
        jwks = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with jwks._lock:
                    jwks.requests += 1
                    jwks.authorization.append(self.headers.get("Authorization"))
                    body, status, delay = jwks.document(), jwks.status, jwks.delay
                    cache_control = jwks.cache_control
                jwks.request_seen.set()
                time.sleep(delay)  # the identity provider being slow
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if cache_control is not None:
                    self.send_header("Cache-Control", cache_control)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add(self, kid: str, kind: str = "RS256") -> PrivateKey:
        """Publish a new key; returns its private half for signing."""
        private: PrivateKey = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            if kind == "RS256" else ec.generate_private_key(ec.SECP256R1())
        )
        with self._lock:
            self.keys[kid] = private
        return private

    def document(self) -> bytes:
        entries = []
        for kid, private in self.keys.items():
            if isinstance(private, rsa.RSAPrivateKey):
                jwk = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
                jwk["alg"] = "RS256"
            else:
                jwk = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
                jwk["alg"] = "ES256"
            entries.append({**jwk, "kid": kid, "use": "sig"})
        document: dict[str, Any] = {"keys": entries + self.extra}
        if self.padding:
            document["filler"] = "x" * self.padding
        return json.dumps(document).encode()

    def token(self, kid: str, sub: str = "alice", **kwargs: Any) -> str:
        private = self.keys[kid]
        algorithm = "RS256" if isinstance(private, rsa.RSAPrivateKey) else "ES256"
        return make_token(sub, algorithm=algorithm, key=private, headers={"kid": kid}, **kwargs)

    def __enter__(self) -> Jwks:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(WAIT)


class Clock:
    """``time`` for the JWKS cache, with a monotonic clock the test can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def time(self) -> float:
        return time.time()

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
def jwks() -> Iterator[Jwks]:
    with Jwks() as server:
        server.add("k1", "RS256")
        server.add("e1", "ES256")
        yield server


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(wsbroker.auth, "time", fake)
    return fake


def hand_made_token(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> str:
    """A JWT built without pyjwt: HMAC-SHA256 with ``secret``, or unsigned."""
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    if secret is None:
        return signing_input + "."
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


async def jwks_node(start_node: NodeFactory, url: str) -> Node:
    return await start_node(jwks_url=url, jwt_secret=None, jwt_algorithms=("RS256", "ES256"))


async def status_of(url: str, token: str) -> int:
    """101 when the upgrade is accepted (and a welcome arrives), else the HTTP status."""
    try:
        async with Client.connect(url, token, how="header") as client:
            assert client.welcome is not None
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


async def test_tokens_with_known_kids_are_accepted(start_node: NodeFactory, jwks: Jwks) -> None:
    """RS256 and ES256 tokens whose kid is in the JWKS are accepted; one fetch serves both."""
    node = await jwks_node(start_node, jwks.url)
    url = ws_url(node)
    async with Client.connect(url, jwks.token("k1", "rsa-user")) as client:
        assert client.welcome is not None and client.welcome["user"] == "rsa-user"
    async with Client.connect(url, jwks.token("e1", "ec-user"), how="message") as client:
        assert client.welcome is not None and client.welcome["user"] == "ec-user"
    assert jwks.requests == 1


async def test_token_signed_by_unpublished_key_is_refused(
    start_node: NodeFactory, jwks: Jwks,
) -> None:
    """A token naming a published kid but signed by another key → 401."""
    node = await jwks_node(start_node, jwks.url)
    impostor = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = make_token(algorithm="RS256", key=impostor, headers={"kid": "k1"})
    assert await status_of(ws_url(node), forged) == 401


async def test_key_rotation_new_kid_is_fetched(
    start_node: NodeFactory, jwks: Jwks, clock: Clock,
) -> None:
    """A key added to the JWKS later (a rotation) is fetched when a token names its kid."""
    node = await jwks_node(start_node, jwks.url)
    url = ws_url(node)
    assert await status_of(url, jwks.token("k1")) == 101
    jwks.add("k2", "RS256")
    clock.advance(REFETCH_INTERVAL + 0.1)
    assert await status_of(url, jwks.token("k2", "rotated")) == 101
    assert jwks.requests == 2
    assert await status_of(url, jwks.token("k1")) == 101  # the old key is still published
    assert jwks.requests == 2


async def test_unknown_kids_refetch_at_most_once_per_10s(
    start_node: NodeFactory, jwks: Jwks, clock: Clock,
) -> None:
    """Unknown kids twice within 10 s cost one extra JWKS fetch; the next after 10 s."""
    node = await jwks_node(start_node, jwks.url)
    url = ws_url(node)
    assert await status_of(url, jwks.token("k1")) == 101
    assert jwks.requests == 1
    clock.advance(REFETCH_INTERVAL + 0.1)
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for kid in ("made-up-1", "made-up-2"):
        token = make_token(algorithm="RS256", key=stranger, headers={"kid": kid})
        assert await status_of(url, token) == 401
    assert jwks.requests == 2
    clock.advance(REFETCH_INTERVAL + 0.1)
    token = make_token(algorithm="RS256", key=stranger, headers={"kid": "made-up-3"})
    assert await status_of(url, token) == 401
    assert jwks.requests == 3


async def test_fetch_does_not_block_other_clients(
    start_node: NodeFactory, jwks: Jwks, clock: Clock,
) -> None:
    """While a slow JWKS fetch is in flight, a connected client's ping is answered at once."""
    node = await jwks_node(start_node, jwks.url)
    url = ws_url(node)
    async with Client.connect(url, jwks.token("k1", "connected")) as connected:
        jwks.add("k2", "RS256")
        jwks.delay = 1.0
        jwks.request_seen.clear()
        clock.advance(REFETCH_INTERVAL + 0.1)
        newcomer = asyncio.create_task(status_of(url, jwks.token("k2", "newcomer")))
        assert await asyncio.to_thread(jwks.request_seen.wait, WAIT), "no JWKS fetch started"
        started = time.monotonic()
        reply = await connected.request("ping")
        elapsed = time.monotonic() - started
        assert reply["type"] == "ok"
        assert elapsed < 0.3, f"ping took {elapsed:.2f}s during the JWKS fetch"
        assert not newcomer.done(), "the fetch should still be in flight"
        assert await asyncio.wait_for(newcomer, WAIT) == 101


async def test_handshakes_during_a_fetch_wait_for_it(
    start_node: NodeFactory, jwks: Jwks,
) -> None:
    """Clients arriving at a fresh node while its first JWKS fetch is in flight (e.g. all
    reconnecting after a deploy) wait for that fetch and are accepted, not refused."""
    node = await jwks_node(start_node, jwks.url)
    jwks.delay = 0.5
    url = ws_url(node)
    first = asyncio.create_task(status_of(url, jwks.token("k1", "first")))
    assert await asyncio.to_thread(jwks.request_seen.wait, WAIT), "no JWKS fetch started"
    later = [asyncio.create_task(status_of(url, jwks.token(kid, f"later-{kid}")))
             for kid in ("k1", "e1")]
    statuses = await asyncio.wait_for(asyncio.gather(first, *later), WAIT)
    assert statuses == [101, 101, 101]
    assert jwks.requests == 1


async def test_jwks_down_gives_401_and_node_keeps_running(start_node: NodeFactory) -> None:
    """With the JWKS endpoint unreachable, tokens get 401 and the node stays healthy."""
    node = await jwks_node(start_node, f"http://127.0.0.1:{free_port()}/jwks.json")
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = make_token(algorithm="RS256", key=private, headers={"kid": "k1"})
    for _ in range(2):
        assert await status_of(ws_url(node), token) == 401
    status, _, body = await asyncio.to_thread(http_get, http_url(node) + "/healthz")
    assert (status, body.strip()) == (200, "ok")


async def test_jwks_error_keeps_cached_keys(
    start_node: NodeFactory, jwks: Jwks, clock: Clock,
) -> None:
    """If a refetch fails (HTTP 500), keys fetched earlier keep working."""
    node = await jwks_node(start_node, jwks.url)
    url = ws_url(node)
    assert await status_of(url, jwks.token("k1")) == 101
    jwks.status = 500
    clock.advance(REFETCH_INTERVAL + 0.1)
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert await status_of(url, make_token(algorithm="RS256", key=stranger,
                                           headers={"kid": "nope"})) == 401
    assert jwks.requests == 2
    assert await status_of(url, jwks.token("k1")) == 101
    assert await status_of(url, jwks.token("e1")) == 101


async def test_jwks_node_refuses_hs256_and_none(start_node: NodeFactory, jwks: Jwks) -> None:
    """A JWKS-configured node never accepts HS256 (even keyed with the JWKS text) or none."""
    node = await jwks_node(start_node, jwks.url)
    url = ws_url(node)
    claims = {"sub": "mallory", "exp": int(time.time()) + 600, "channels": [">"]}
    hs256 = hand_made_token({"alg": "HS256", "kid": "k1"}, claims, jwks.document())
    none = hand_made_token({"alg": "none", "kid": "k1"}, claims, None)
    for token in (hs256, none):
        assert await status_of(url, token) == 401


# -- what a JWKS may contain --------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def test_symmetric_jwks_keys_are_never_used(start_node: NodeFactory, jwks: Jwks) -> None:
    """An `oct` key in the JWKS is public: anyone could sign with it. Tokens HMAC-signed
    with it are refused whatever algorithm their header claims; the RSA key still works."""
    shared = b"published-for-all-to-see-0123456789abcdef"
    jwks.extra = [{"kty": "oct", "kid": "sym", "k": b64url(shared), "alg": "HS256"},
                  {"kty": "oct", "kid": "sym-rs", "k": b64url(shared), "alg": "RS256"}]
    node = await start_node(jwks_url=jwks.url, jwt_secret=None,
                            jwt_algorithms=("RS256", "HS256"))
    claims = {"sub": "mallory", "exp": int(time.time()) + 600, "channels": [">"]}
    for kid in ("sym", "sym-rs"):
        for alg in ("RS256", "HS256"):
            forged = hand_made_token({"alg": alg, "kid": kid}, claims, shared)
            assert await status_of(ws_url(node), forged) == 401, (kid, alg)
    assert await status_of(ws_url(node), jwks.token("k1")) == 101


async def test_jwks_key_verifies_only_its_own_allowed_algorithm(
    start_node: NodeFactory, jwks: Jwks,
) -> None:
    """A JWK naming `alg` RS256 never verifies a PS256 token, even when PS256 is allowed;
    a JWK whose `alg` is not allowed is not used at all."""
    private = jwks.keys["k1"]
    node = await start_node(jwks_url=jwks.url, jwt_secret=None,
                            jwt_algorithms=("RS256", "PS256", "ES256"))
    pss = make_token(algorithm="PS256", key=private, headers={"kid": "k1"})
    assert await status_of(ws_url(node), pss) == 401
    assert await status_of(ws_url(node), jwks.token("k1")) == 101
    only_es = await start_node(jwks_url=jwks.url, jwt_secret=None, jwt_algorithms=("ES256",))
    assert await status_of(ws_url(only_es), jwks.token("k1")) == 401
    assert await status_of(ws_url(only_es), jwks.token("e1")) == 101


# -- fetch at start, readiness, refresh --------------------------------------------------


async def readyz(node: Node) -> int:
    return (await asyncio.to_thread(http_get, http_url(node) + "/readyz"))[0]


async def test_jwks_is_fetched_at_start_and_readiness_waits_for_it(
    start_node: NodeFactory, jwks: Jwks,
) -> None:
    """The node fetches the JWKS as it starts, before any token; /readyz is 503 until
    the keys are in, then 200."""
    jwks.delay = 1.0
    node = await jwks_node(start_node, jwks.url)
    assert await asyncio.to_thread(jwks.request_seen.wait, WAIT), "no fetch at start"
    assert await readyz(node) == 503

    async def ready() -> bool:
        return await readyz(node) == 200

    await eventually(ready, every=0.05)
    assert await status_of(ws_url(node), jwks.token("k1")) == 101
    assert jwks.requests == 1


async def test_node_without_usable_jwks_keys_is_not_ready(
    start_node: NodeFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    """A JWKS that cannot be fetched keeps /readyz at 503 (no token could verify);
    the process stays alive (/healthz 200)."""
    node = await jwks_node(start_node, f"http://127.0.0.1:{free_port()}/jwks.json")
    await eventually(lambda: "JWKS fetch from" in caplog.text)  # the first fetch failed
    assert "keeping 0 cached keys" in caplog.text
    assert await readyz(node) == 503
    assert (await asyncio.to_thread(http_get, http_url(node) + "/healthz"))[0] == 200


@pytest.mark.parametrize(("header", "seconds"), [
    (None, 300.0),
    ("max-age=600", 600.0),
    ("public, max-age=7200, must-revalidate", 3600.0),  # capped
    ("max-age=5", 60.0),  # floored
    ("no-cache", 60.0),
    ("no-store, max-age=900", 60.0),
    ("max-age=nonsense", 300.0),
])
def test_refresh_delay_honours_cache_control_within_bounds(
    header: str | None, seconds: float,
) -> None:
    assert wsbroker.auth.refresh_delay(header) == seconds


async def test_key_replaced_under_the_same_kid_is_picked_up_on_schedule(
    start_node: NodeFactory, jwks: Jwks, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The JWKS is refetched when its max-age runs out; a key replaced under the same
    kid then verifies, and tokens of the withdrawn key (even remembered ones) are refused."""
    monkeypatch.setattr(wsbroker.auth, "JWKS_MIN_REFRESH", 0.2)
    jwks.cache_control = "max-age=0"
    node = await jwks_node(start_node, jwks.url)
    url = ws_url(node)
    old_token = jwks.token("k1", "old")
    assert await status_of(url, old_token) == 101
    jwks.add("k1", "RS256")  # new material, same kid
    seen = jwks.requests
    await eventually(lambda: jwks.requests >= seen + 2, timeout=WAIT)
    assert await status_of(url, jwks.token("k1", "new")) == 101
    assert await status_of(url, old_token) == 401


async def test_key_replaced_under_the_same_kid_is_fetched_on_a_bad_signature(
    start_node: NodeFactory, jwks: Jwks, clock: Clock,
) -> None:
    """A token that fails its signature check under a known kid triggers one refetch
    (rate-limited like unknown kids), so a rotated key works before the schedule."""
    node = await jwks_node(start_node, jwks.url)
    url = ws_url(node)
    assert await status_of(url, jwks.token("k1")) == 101
    jwks.add("k1", "RS256")
    clock.advance(REFETCH_INTERVAL + 0.1)
    assert await status_of(url, jwks.token("k1", "rotated")) == 101
    assert jwks.requests == 2


async def test_oversized_jwks_response_is_refused(
    start_node: NodeFactory, jwks: Jwks, caplog: pytest.LogCaptureFixture,
) -> None:
    """A JWKS response over the size bound is not read on: no keys, not ready, a clear log."""
    jwks.padding = wsbroker.auth.JWKS_MAX_BYTES
    node = await jwks_node(start_node, jwks.url)
    await eventually(lambda: "over" in caplog.text)
    assert f"over {wsbroker.auth.JWKS_MAX_BYTES}" in caplog.text
    assert await readyz(node) == 503
    assert await status_of(ws_url(node), jwks.token("k1")) == 401


async def test_jwks_url_credentials_are_sent_but_never_logged(
    start_node: NodeFactory, jwks: Jwks, caplog: pytest.LogCaptureFixture,
) -> None:
    """user:password in the JWKS URL becomes HTTP Basic auth; logs show neither it nor
    the query string (which may carry an API key)."""
    caplog.set_level("INFO")
    url = jwks.url.replace("http://", "http://idp-user:s3cr%40t-pw@") + "?api_key=k3y-in-query"
    node = await jwks_node(start_node, url)
    await eventually(lambda: node.verifier.ready)
    expected = "Basic " + base64.b64encode(b"idp-user:s3cr@t-pw").decode()
    assert jwks.authorization[0] == expected
    assert "JWKS fetched from http://[redacted]@127.0.0.1" in caplog.text
    for secret in ("s3cr", "idp-user", "k3y-in-query"):
        assert secret not in caplog.text
