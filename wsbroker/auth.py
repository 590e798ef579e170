"""JWT verification (pyjwt) → :class:`Identity` (SPEC §2).

The algorithm allow-list is narrowed to the key's family before any token is
seen: a shared secret verifies only HS*, a public key or a JWKS key only the
asymmetric algorithms of its own type, so a public key can never be used as an
HMAC secret (algorithm confusion) and ``none`` is never accepted. A JWKS key
is used only through the algorithms allowed for it, and symmetric JWKS keys
are never used at all.

pyjwt checks the signature, through its public API only (a ``PyJWS`` of our
own that knows only the allowed algorithms), so every pyjwt release from the
floor in ``pyproject.toml`` up behaves the same (``scripts/test`` runs these
tests against that floor too). The few registered claims we use are checked
here, on the payload pyjwt has verified: parsing the token a second time for
``PyJWT.decode`` would double the cost of a handshake.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import time
import urllib.request
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit, urlunsplit

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm

from wsbroker.channels import InvalidPattern, PatternSet
from wsbroker.config import Settings
from wsbroker.logs import safe_url
from wsbroker.tasks import cancel_and_wait

log = logging.getLogger("wsbroker.auth")

JWKS_REFETCH_INTERVAL = 10.0  # on-demand refetches (unknown kid, bad signature), at most
JWKS_MIN_REFRESH = 60.0  # scheduled refetches: never more often, whatever max-age says
JWKS_MAX_REFRESH = 3600.0  # … and never less often (a withdrawn key stops working by then)
JWKS_DEFAULT_REFRESH = 300.0  # without a Cache-Control max-age
JWKS_FETCH_TIMEOUT = 5.0
JWKS_MAX_BYTES = 512 * 1024  # real key sets are a few KiB
VERIFIED_TOKENS_CAPACITY = 10_000
MAX_EXP = 2**53  # beyond this a timestamp is no longer an exact JSON number
MAX_CLAIM_PATTERNS = 256  # per permission claim (`channels`, `publish`)
MAX_CLAIM_CHARS = 8192  # characters of patterns per permission claim
_HMAC_ALGORITHMS = {
    "HS256": HMACAlgorithm.SHA256,
    "HS384": HMACAlgorithm.SHA384,
    "HS512": HMACAlgorithm.SHA512,
}
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp256k1": "ES256K", "secp384r1": "ES384",
                  "secp521r1": "ES512"}


class AuthError(Exception):
    """A token we refuse. ``reason`` is a short metric label; str() is for humans."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a connection is and what its token lets it do."""

    user: str
    expires: float
    channels: PatternSet
    publish: PatternSet
    info: dict[str, Any] | None = None
    """The token's optional ``info`` claim, shown to others in presence (SPEC §11)."""


class JwksKey(NamedTuple):
    """One usable JWKS key: the public key and the algorithms it may verify."""

    key: Any
    algorithms: frozenset[str]
    material: bytes  # the JWK as published, to notice a key replaced under its kid


class JwksCache:
    """Keys from a JWKS URL, fetched in a thread: at start, on a schedule, on demand.

    The first fetch starts with the node and ``/readyz`` waits for it. Then the
    set is refetched when its ``Cache-Control: max-age`` runs out (kept within
    :data:`JWKS_MIN_REFRESH` … :data:`JWKS_MAX_REFRESH`), so withdrawn keys and
    keys replaced under the same ``kid`` are noticed; and on demand when a
    token names an unknown ``kid`` or fails its signature check, at most once
    per :data:`JWKS_REFETCH_INTERVAL`, so a flood of forged tokens cannot
    hammer the identity provider.
    """

    def __init__(self, url: str, algorithms: Collection[str]) -> None:
        self._url = url
        self._safe_url = safe_url(url)
        self._allowed = frozenset(algorithms)
        self._keys: dict[str, JwksKey] = {}
        self._loaded = False
        self._fetched_at = -JWKS_REFETCH_INTERVAL
        self._next_refresh = JWKS_REFETCH_INTERVAL
        self._inflight: asyncio.Task[None] | None = None
        self._schedule: asyncio.Task[None] | None = None
        self.generation = 0  # bumped whenever a key is added, removed or replaced

    @property
    def ready(self) -> bool:
        """True once a fetch has brought at least one usable key."""
        return self._loaded

    def start(self) -> None:
        if self._schedule is None:
            self._schedule = asyncio.create_task(self._refresh_on_schedule())

    async def stop(self) -> None:
        for task in (self._schedule, self._inflight):
            if task is not None:
                await cancel_and_wait(task)
        self._schedule = self._inflight = None

    async def _refresh_on_schedule(self) -> None:
        while True:
            await self._refresh()
            await asyncio.sleep(self._next_refresh)

    async def key_for(self, kid: str | None) -> JwksKey:
        key = self._lookup(kid)
        if key is None and await self.refetch():
            key = self._lookup(kid)
        if key is None:
            raise AuthError("unknown_key", "token signed by an unknown key")
        return key

    async def refetch(self) -> bool:
        """Fetch again unless the last fetch was too recent; joins a fetch under way."""
        if self._inflight is None and (
            time.monotonic() - self._fetched_at < JWKS_REFETCH_INTERVAL
        ):
            return False
        await self._refresh()
        return True

    def _lookup(self, kid: str | None) -> JwksKey | None:
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    async def _refresh(self) -> None:
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._fetch())
            self._inflight.add_done_callback(self._fetched)
        await asyncio.shield(self._inflight)

    def _fetched(self, task: asyncio.Task[None]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def _fetch(self) -> None:
        self._fetched_at = time.monotonic()
        self._next_refresh = JWKS_REFETCH_INTERVAL  # until a fetch succeeds
        try:
            document, cache_control = await asyncio.to_thread(_download, self._url)
            fresh = usable_keys(document, self._allowed, self._safe_url)
        except Exception as exc:  # the IdP is down or sent garbage: keep old keys
            log.warning("JWKS fetch from %s failed: %s; keeping %d cached keys, "
                        "retrying in %.0fs", self._safe_url, exc, len(self._keys),
                        self._next_refresh)
            return
        if {kid: key.material for kid, key in fresh.items()} != {
            kid: key.material for kid, key in self._keys.items()
        }:
            self.generation += 1
        self._keys = fresh
        self._loaded = True
        self._next_refresh = refresh_delay(cache_control)
        log.info("JWKS fetched from %s: %d keys; next refresh in %.0fs",
                 self._safe_url, len(fresh), self._next_refresh)


def refresh_delay(cache_control: str | None) -> float:
    """Seconds until the next scheduled JWKS fetch, from a ``Cache-Control`` header.

    ``max-age`` is honoured within bounds: never more often than
    :data:`JWKS_MIN_REFRESH` (``no-cache``/``no-store``/``max-age=0`` included),
    never less often than :data:`JWKS_MAX_REFRESH` (a withdrawn key must stop
    working within that); no header means :data:`JWKS_DEFAULT_REFRESH`.
    """
    directives = {
        name.strip().lower(): value.strip().strip('"')
        for name, _, value in (part.partition("=") for part in (cache_control or "").split(","))
    }
    if "no-store" in directives or "no-cache" in directives:
        return JWKS_MIN_REFRESH
    try:
        seconds = float(directives.get("max-age", ""))
    except ValueError:
        seconds = JWKS_DEFAULT_REFRESH
    return min(max(seconds, JWKS_MIN_REFRESH), JWKS_MAX_REFRESH)


def usable_keys(document: Any, allowed: frozenset[str], source: str) -> dict[str, JwksKey]:
    """The JWKS's keys we may verify with, by ``kid``; raises if none is usable.

    Only public asymmetric keys (RSA, EC, OKP) are kept, each limited to the
    algorithms of its family that the allow-list has (and to its ``alg`` when
    the JWK names one). A symmetric (``oct``) key is never used: the JWKS is
    public, so an HMAC key in it would let anyone who reads it sign tokens.
    """
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError("not a JWKS (no 'keys' list)")
    keys: dict[str, JwksKey] = {}
    for entry in entries:
        try:
            kid, key = _usable_key(entry, allowed)
        except ValueError as exc:
            log.warning("JWKS %s: ignoring a key: %s", source, exc)
            continue
        keys[kid] = key
    if not keys:
        raise ValueError(f"no usable key among {len(entries)} (allowed algorithms: "
                         f"{', '.join(sorted(allowed))})")
    return keys


_JWK_READERS: dict[str, Any] = {"RSA": RSAAlgorithm, "EC": ECAlgorithm, "OKP": OKPAlgorithm}


def _usable_key(entry: Any, allowed: frozenset[str]) -> tuple[str, JwksKey]:
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    kid = entry.get("kid", "")
    if not isinstance(kid, str):
        raise ValueError(f"kid {kid!r} is not a string")
    name = f"kid {kid!r}"
    kty, alg, use = entry.get("kty"), entry.get("alg"), entry.get("use")
    reader = _JWK_READERS.get(kty) if isinstance(kty, str) else None
    if reader is None:
        raise ValueError(f"{name}: key type {kty!r} is not a public asymmetric key type "
                         "(symmetric 'oct' keys are never accepted from a JWKS)")
    if use not in (None, "sig"):
        raise ValueError(f"{name}: use {use!r} is not 'sig'")
    if alg is not None and alg not in allowed:
        raise ValueError(f"{name}: algorithm {alg!r} is not in --jwt-algorithms")
    try:
        key = reader.from_jwk(entry)
    except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{name}: not a valid {kty} key ({exc})") from None
    family = _key_family(key)  # ValueError for a private key
    algorithms = family & allowed & ({alg} if alg is not None else family)
    if not algorithms:
        raise ValueError(f"{name}: none of its algorithms ({', '.join(sorted(family))}) "
                         "is in --jwt-algorithms")
    material = json.dumps(entry, sort_keys=True).encode()
    return kid, JwksKey(key, frozenset(algorithms), material)


def _download(url: str) -> tuple[Any, str | None]:
    """The JWKS document and its ``Cache-Control``, at most :data:`JWKS_MAX_BYTES`.

    Credentials in the URL (``https://user:pass@idp/…``) are sent as HTTP Basic
    authentication (urllib would not), never logged.
    """
    parts = urlsplit(url)
    headers = {"Accept": "application/json"}
    if parts.username is not None or parts.password is not None:
        credentials = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
        url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=JWKS_FETCH_TIMEOUT) as response:
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > JWKS_MAX_BYTES:
            raise ValueError(f"the response is {length} bytes, over {JWKS_MAX_BYTES}")
        body = response.read(JWKS_MAX_BYTES + 1)
        if len(body) > JWKS_MAX_BYTES:
            raise ValueError(f"the response is over {JWKS_MAX_BYTES} bytes")
        return json.loads(body), response.headers.get("Cache-Control")


class VerifiedTokens:
    """Tokens that verified, remembered until they expire (bounded, oldest out).

    A client that reconnects (after a drain, a network blip, a page reload)
    presents the same token again; remembering the outcome spares the
    signature check, so a reconnect storm costs no cryptography. The key is
    the whole token, signature included, and only successes are kept.
    """

    def __init__(self, leeway: float, capacity: int = VERIFIED_TOKENS_CAPACITY) -> None:
        self._leeway = leeway
        self._capacity = capacity
        self._identities: dict[str, Identity] = {}

    def get(self, token: str) -> Identity | None:
        identity = self._identities.get(token)
        if identity is not None and identity.expires + self._leeway < time.time():
            del self._identities[token]
            return None
        return identity

    def put(self, token: str, identity: Identity) -> None:
        if len(self._identities) >= self._capacity:
            del self._identities[next(iter(self._identities))]
        self._identities[token] = identity

    def clear(self) -> None:
        self._identities.clear()


class _PreparedHMAC(HMACAlgorithm):
    """HMAC whose key checks run once per key, not once per token.

    pyjwt re-validates an HMAC secret on every verification (it tries to parse
    it as PEM, SSH, DER, X.509 and JSON, to refuse asymmetric keys used as
    secrets); for one configured secret that is most of a handshake's cost.
    """

    def __init__(self, hash_alg: Any) -> None:
        super().__init__(hash_alg)
        self._prepared: dict[str | bytes, bytes] = {}

    def prepare_key(self, key: str | bytes) -> bytes:
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = self._prepared[key] = super().prepare_key(key)
        return prepared


def _public_key(path: str) -> Any:
    """The PEM public key, parsed once (pyjwt would parse PEM bytes per token)."""
    with open(path, "rb") as pem:
        data = pem.read()
    try:
        return load_pem_public_key(data)
    except ValueError as exc:
        raise ValueError(f"--jwt-public-key {path}: not a PEM public key ({exc})") from None


def _key_family(key: Any) -> frozenset[str]:
    """The algorithms a public key can verify: an RSA key never checks ES256, a
    P-256 key only ES256, etc. A private key is refused (it has no place here)."""
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        algorithm = _EC_ALGORITHMS.get(key.curve.name)
        if algorithm is None:
            raise ValueError(f"unsupported elliptic curve {key.curve.name}")
        return frozenset({algorithm})
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return frozenset({"EdDSA"})
    raise ValueError(f"unsupported public key type {type(key).__name__}")


class Verifier:
    """Checks tokens against the configured key, algorithms and claims."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._jwks: JwksCache | None = None
        self._verified = VerifiedTokens(settings.jwt_leeway)
        self._jwks_generation = 0
        self._static_key: Any = None
        if settings.jwt_public_key:
            self._static_key = _public_key(settings.jwt_public_key)
            family = _key_family(self._static_key)
            self._algorithms = [a for a in settings.jwt_algorithms if a in family]
        elif settings.jwks_url:
            self._algorithms = [a for a in settings.jwt_algorithms if a not in _HMAC_ALGORITHMS]
            self._jwks = JwksCache(settings.jwks_url, self._algorithms)
        else:
            self._static_key = settings.jwt_secret
            self._algorithms = [a for a in settings.jwt_algorithms if a in _HMAC_ALGORITHMS]
        if not self._algorithms:
            raise ValueError(
                "--jwt-algorithms allows no algorithm that fits the configured key "
                "(HS* need --jwt-secret; RS/ES/PS/EdDSA need a public key or JWKS)"
            )
        self._signatures = _signature_checker(self._algorithms)

    @property
    def ready(self) -> bool:
        """False until a JWKS, when one is configured, has brought its first keys."""
        return self._jwks is None or self._jwks.ready

    def start(self) -> None:
        """Begin fetching the JWKS (if any) in the background; see :attr:`ready`."""
        if self._jwks is not None:
            self._jwks.start()

    async def stop(self) -> None:
        if self._jwks is not None:
            await self._jwks.stop()

    async def verify(self, token: str) -> Identity:
        """The token's :class:`Identity`, or :class:`AuthError` saying why not."""
        self._forget_withdrawn_keys()
        identity = self._verified.get(token)
        if identity is None:
            identity = await self._verify(token)
            self._forget_withdrawn_keys()
            self._verified.put(token, identity)
        return identity

    def verify_now(self, token: str) -> Identity | None:
        """The token's :class:`Identity` when no key has to be fetched for it (a
        static key, or a token verified before), else None: then await
        :meth:`verify`. Lets a handshake be decided without a task."""
        self._forget_withdrawn_keys()
        identity = self._verified.get(token)
        if identity is None and self._jwks is None:
            identity = self._decode(token, self._static_key, self._algorithms)
            self._verified.put(token, identity)
        return identity

    async def _verify(self, token: str) -> Identity:
        if self._jwks is None:
            return self._decode(token, self._static_key, self._algorithms)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed", "token is not a JWT") from None
        algorithm, kid = header.get("alg"), header.get("kid")
        if algorithm not in self._algorithms:
            raise AuthError("algorithm", f"algorithm {algorithm!r} is not allowed")
        kid = kid if isinstance(kid, str) else None
        key = await self._jwks.key_for(kid)
        try:
            return self._decode(token, key.key, _algorithms_of(key, algorithm))
        except AuthError as exc:
            # The key may have been replaced under the same kid: look once more.
            if exc.reason != "signature" or not await self._jwks.refetch():
                raise
            fresh = await self._jwks.key_for(kid)
            if fresh.material == key.material:
                raise
            return self._decode(token, fresh.key, _algorithms_of(fresh, algorithm))

    def _forget_withdrawn_keys(self) -> None:
        """Tokens remembered as verified may have been signed by a key that is gone."""
        if self._jwks is not None and self._jwks.generation != self._jwks_generation:
            self._verified.clear()
            self._jwks_generation = self._jwks.generation

    def _decode(self, token: str, key: Any, algorithms: list[str]) -> Identity:
        try:
            payload = self._signatures.decode_complete(token, key, algorithms=algorithms)
        except jwt.InvalidAlgorithmError:
            algorithm = jwt.get_unverified_header(token).get("alg")
            raise AuthError("algorithm", f"algorithm {algorithm!r} is not allowed") from None
        except jwt.InvalidSignatureError:  # before DecodeError, its base class
            raise AuthError("signature", "token signature is invalid") from None
        except jwt.DecodeError as exc:
            raise AuthError("malformed", f"token is not a valid JWT: {exc}") from None
        except jwt.PyJWTError as exc:
            raise AuthError("invalid", f"token is invalid: {exc}") from None
        except (TypeError, ValueError, NotImplementedError) as exc:  # a key that cannot check it
            raise AuthError("invalid", f"token cannot be verified: {exc}") from None
        try:
            claims = orjson.loads(payload["payload"])
        except orjson.JSONDecodeError:
            raise AuthError("malformed", "token payload is not JSON") from None
        if not isinstance(claims, dict):
            raise AuthError("malformed", "token payload is not a JSON object")
        self._check_times_and_audience(claims)
        return _identity(claims)

    def _check_times_and_audience(self, claims: dict[str, Any]) -> None:
        """``exp``, ``nbf``, ``iat`` (with leeway), then ``aud``/``iss`` when configured.

        The rules are RFC 7519's, as pyjwt applies them; a token carrying an
        ``aud`` or ``iss`` we were not told to check is not refused for it.
        """
        settings = self._settings
        now, leeway = time.time(), settings.jwt_leeway
        for name in ("exp", "sub"):
            if claims.get(name) is None:
                raise AuthError("claims", f"token lacks the {name!r} claim")
        for name in ("exp", "nbf", "iat"):
            value = claims.get(name)
            if value is not None and (not isinstance(value, int | float)
                                      or isinstance(value, bool)):
                raise AuthError("claims", f"token {name!r} must be a number")
        if claims["exp"] <= now - leeway:
            raise AuthError("expired", "token has expired")
        for name in ("nbf", "iat"):
            if claims.get(name) is not None and claims[name] > now + leeway:
                raise AuthError("invalid", f"token is not valid yet ({name!r} is in the future)")
        if settings.jwt_audience is not None:
            audience = claims.get("aud")
            if not audience:
                raise AuthError("claims", "token lacks the 'aud' claim")
            if settings.jwt_audience not in (audience if isinstance(audience, list)
                                             else [audience]):
                raise AuthError("claims", "token refused: audience doesn't match")
        if settings.jwt_issuer is not None:
            if "iss" not in claims:
                raise AuthError("claims", "token lacks the 'iss' claim")
            if claims["iss"] != settings.jwt_issuer:
                raise AuthError("claims", "token refused: issuer doesn't match")


def _algorithms_of(key: JwksKey, algorithm: str) -> list[str]:
    """The token's algorithm, if this JWKS key may verify it."""
    if algorithm not in key.algorithms:
        raise AuthError("algorithm", f"algorithm {algorithm!r} does not fit the key "
                                     f"(it verifies {', '.join(sorted(key.algorithms))})")
    return [algorithm]


def _signature_checker(algorithms: list[str]) -> jwt.PyJWS:
    """A PyJWS of our own that knows only ``algorithms``, with HMAC keys prepared once."""
    jws = jwt.PyJWS(algorithms=algorithms)
    for name in algorithms:
        if name in _HMAC_ALGORITHMS:
            jws.unregister_algorithm(name)
            jws.register_algorithm(name, _PreparedHMAC(_HMAC_ALGORITHMS[name]))
    return jws


def _identity(claims: dict[str, Any]) -> Identity:
    user, expires = claims.get("sub"), claims.get("exp")
    if not isinstance(user, str) or not user:
        raise AuthError("claims", "token 'sub' must be a non-empty string")
    if not isinstance(expires, int | float) or isinstance(expires, bool):
        raise AuthError("claims", "token 'exp' must be a number")
    if not abs(expires) < MAX_EXP:
        raise AuthError("claims", "token 'exp' is out of range")
    try:
        channels = _patterns(claims, "channels")
        publish = _patterns(claims, "publish")
    except InvalidPattern as exc:
        raise AuthError("claims", f"token permission claims are invalid: {exc}") from None
    return Identity(user, expires, channels, publish, _info(claims))


MAX_INFO_BYTES = 1024


def _info(claims: dict[str, Any]) -> dict[str, Any] | None:
    """The ``info`` claim: absent, or a JSON object of at most 1 KiB as compact UTF-8 JSON."""
    if "info" not in claims:
        return None
    info = claims["info"]
    if not isinstance(info, dict):
        raise AuthError("claims", "token 'info' must be a JSON object")
    try:
        size = len(orjson.dumps(info))
    except orjson.JSONEncodeError:  # e.g. an integer beyond 64 bits
        raise AuthError("claims", "token 'info' cannot be encoded as JSON") from None
    if size > MAX_INFO_BYTES:
        raise AuthError("claims", f"token 'info' is {size} bytes; at most {MAX_INFO_BYTES}")
    return info


def _patterns(claims: dict[str, Any], name: str) -> PatternSet:
    value = claims.get(name, [])
    if not isinstance(value, list):
        raise InvalidPattern(f"{name!r} must be a list of channel patterns")
    if len(value) > MAX_CLAIM_PATTERNS:
        raise InvalidPattern(f"{name!r} has {len(value)} patterns; at most "
                             f"{MAX_CLAIM_PATTERNS} are allowed")
    size = sum(len(item) if isinstance(item, str) else 0 for item in value)
    if size > MAX_CLAIM_CHARS:
        raise InvalidPattern(f"{name!r} has {size} characters of patterns; at most "
                             f"{MAX_CLAIM_CHARS} are allowed")
    if all(isinstance(item, str) for item in value):
        return _compiled(tuple(value))
    return PatternSet.parse(value)  # raises, saying which item is not a pattern


@functools.lru_cache(maxsize=1024)
def _compiled(texts: tuple[str, ...]) -> PatternSet:
    """One compiled (immutable) set per distinct claim: tokens of the same role, as
    most are, share it instead of each connection holding its own index."""
    return PatternSet.parse(texts)
