"""JWT verification (pyjwt) → :class:`Identity` (SPEC §2).

The algorithm allow-list is narrowed to the key's family before any token is
seen: a shared secret verifies only HS*, a public key or JWKS only asymmetric
algorithms, so a public key can never be used as an HMAC secret (algorithm
confusion) and ``none`` is never accepted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import HMACAlgorithm

from wsbroker.channels import InvalidPattern, PatternSet
from wsbroker.config import Settings

log = logging.getLogger("wsbroker.auth")

JWKS_REFETCH_INTERVAL = 10.0
JWKS_FETCH_TIMEOUT = 5.0
VERIFIED_TOKENS_CAPACITY = 10_000
MAX_EXP = 2**53  # beyond this a timestamp is no longer an exact JSON number
_HMAC_ALGORITHMS = {
    "HS256": HMACAlgorithm.SHA256,
    "HS384": HMACAlgorithm.SHA384,
    "HS512": HMACAlgorithm.SHA512,
}


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


class JwksCache:
    """Keys from a JWKS URL, fetched in a thread and refetched on an unknown ``kid``.

    Refetches are limited to one per :data:`JWKS_REFETCH_INTERVAL` so a flood
    of tokens with made-up ``kid`` values cannot hammer the identity provider.
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = -JWKS_REFETCH_INTERVAL
        self._inflight: asyncio.Task[None] | None = None
        self.generation = 0  # bumped whenever the set of keys changes

    async def key_for(self, kid: str | None) -> jwt.PyJWK:
        key = self._lookup(kid)
        if key is None and (
            self._inflight is not None
            or time.monotonic() - self._fetched_at >= JWKS_REFETCH_INTERVAL
        ):
            await self._refresh()  # joins a fetch already under way
            key = self._lookup(kid)
        if key is None:
            raise AuthError("unknown_key", "token signed by an unknown key")
        return key

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
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
        try:
            document = await asyncio.to_thread(_download_json, self._url)
            keys = jwt.PyJWKSet.from_dict(document).keys
        except Exception as exc:  # the IdP is down or sent garbage: keep old keys
            log.warning("JWKS fetch from %s failed: %s; keeping %d cached keys",
                        self._url, exc, len(self._keys))
            return
        fresh = {key.key_id or "": key for key in keys}
        if fresh.keys() != self._keys.keys():
            self.generation += 1
        self._keys = fresh
        log.info("JWKS fetched from %s: %d keys", self._url, len(self._keys))


def _download_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=JWKS_FETCH_TIMEOUT) as response:
        return json.loads(response.read())


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
    """The algorithms a public key can verify: an RSA key never checks ES256, etc."""
    if isinstance(key, rsa.RSAPublicKey):
        return frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
    if isinstance(key, ec.EllipticCurvePublicKey):
        return frozenset({"ES256", "ES256K", "ES384", "ES512"})
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return frozenset({"EdDSA"})
    raise ValueError(f"unsupported public key type {type(key).__name__}")


class Verifier:
    """Checks tokens against the configured key, algorithms and claims."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._jwks = JwksCache(settings.jwks_url) if settings.jwks_url else None
        self._jwt = jwt.PyJWT()
        self._verified = VerifiedTokens(settings.jwt_leeway)
        self._jwks_generation = 0
        self._static_key: Any = None
        if settings.jwt_public_key:
            self._static_key = _public_key(settings.jwt_public_key)
            family = _key_family(self._static_key)
            self._algorithms = [a for a in settings.jwt_algorithms if a in family]
        elif settings.jwks_url:
            self._algorithms = [a for a in settings.jwt_algorithms if a not in _HMAC_ALGORITHMS]
        else:
            self._static_key = settings.jwt_secret
            self._algorithms = [a for a in settings.jwt_algorithms if a in _HMAC_ALGORITHMS]
            jws = self._jwt._jws  # the PyJWS this PyJWT verifies with
            for name in self._algorithms:
                jws.unregister_algorithm(name)
                jws.register_algorithm(name, _PreparedHMAC(_HMAC_ALGORITHMS[name]))
        if not self._algorithms:
            raise ValueError(
                "--jwt-algorithms allows no algorithm that fits the configured key "
                "(HS* need --jwt-secret; RS/ES/PS/EdDSA need a public key or JWKS)"
            )

    async def verify(self, token: str) -> Identity:
        """The token's :class:`Identity`, or :class:`AuthError` saying why not."""
        if self._jwks is not None and self._jwks.generation != self._jwks_generation:
            self._verified.clear()  # a key may have been withdrawn
            self._jwks_generation = self._jwks.generation
        identity = self._verified.get(token)
        if identity is None:
            identity = await self._verify(token)
            self._verified.put(token, identity)
        return identity

    async def _verify(self, token: str) -> Identity:
        key: Any = self._static_key
        if self._jwks is not None:
            try:
                header = jwt.get_unverified_header(token)
            except jwt.PyJWTError:
                raise AuthError("malformed", "token is not a JWT") from None
            if header.get("alg") not in self._algorithms:
                raise AuthError("algorithm", f"algorithm {header.get('alg')!r} is not allowed")
            kid = header.get("kid")
            key = await self._jwks.key_for(kid if isinstance(kid, str) else None)
        return self._decode(token, key)

    def _decode(self, token: str, key: Any) -> Identity:
        settings = self._settings
        try:
            claims = self._jwt.decode(
                token,
                key,
                algorithms=self._algorithms,
                audience=settings.jwt_audience,
                issuer=settings.jwt_issuer,
                leeway=settings.jwt_leeway,
                options={
                    "require": ["exp", "sub"],
                    "verify_aud": settings.jwt_audience is not None,
                    "verify_iss": settings.jwt_issuer is not None,
                },
            )
        except jwt.InvalidAlgorithmError:
            algorithm = jwt.get_unverified_header(token).get("alg")
            raise AuthError("algorithm", f"algorithm {algorithm!r} is not allowed") from None
        except jwt.InvalidSignatureError:  # before DecodeError, its base class
            raise AuthError("signature", "token signature is invalid") from None
        except jwt.DecodeError as exc:
            raise AuthError("malformed", f"token is not a valid JWT: {exc}") from None
        except jwt.ExpiredSignatureError:
            raise AuthError("expired", "token has expired") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError("claims", f"token lacks the {exc.claim!r} claim") from None
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError) as exc:
            raise AuthError("claims", f"token refused: {exc}") from None
        except jwt.PyJWTError as exc:
            raise AuthError("invalid", f"token is invalid: {exc}") from None
        except (TypeError, ValueError) as exc:  # a key that cannot check this token
            raise AuthError("invalid", f"token cannot be verified: {exc}") from None
        return _identity(claims)


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
    return PatternSet.parse(value)
