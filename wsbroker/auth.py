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

from wsbroker.channels import InvalidPattern, PatternSet
from wsbroker.config import Settings

log = logging.getLogger("wsbroker.auth")

JWKS_REFETCH_INTERVAL = 10.0
JWKS_FETCH_TIMEOUT = 5.0
_HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})


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
        self._keys = {key.key_id or "": key for key in keys}
        log.info("JWKS fetched from %s: %d keys", self._url, len(self._keys))


def _download_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=JWKS_FETCH_TIMEOUT) as response:
        return json.loads(response.read())


class Verifier:
    """Checks tokens against the configured key, algorithms and claims."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._jwks = JwksCache(settings.jwks_url) if settings.jwks_url else None
        self._static_key: Any = None
        if settings.jwt_public_key:
            with open(settings.jwt_public_key, "rb") as pem:
                self._static_key = pem.read()
            self._algorithms = [a for a in settings.jwt_algorithms if a not in _HMAC_ALGORITHMS]
        elif settings.jwks_url:
            self._algorithms = [a for a in settings.jwt_algorithms if a not in _HMAC_ALGORITHMS]
        else:
            self._static_key = settings.jwt_secret
            self._algorithms = [a for a in settings.jwt_algorithms if a in _HMAC_ALGORITHMS]
        if not self._algorithms:
            raise ValueError(
                "--jwt-algorithms allows no algorithm that fits the configured key "
                "(HS* need --jwt-secret; RS/ES/PS/EdDSA need a public key or JWKS)"
            )

    async def verify(self, token: str) -> Identity:
        """The token's :class:`Identity`, or :class:`AuthError` saying why not."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed", "token is not a JWT") from None
        algorithm = header.get("alg")
        if algorithm not in self._algorithms:
            raise AuthError("algorithm", f"algorithm {algorithm!r} is not allowed")
        key: Any = self._static_key
        if self._jwks is not None:
            kid = header.get("kid")
            key = await self._jwks.key_for(kid if isinstance(kid, str) else None)
        return self._decode(token, key)

    def _decode(self, token: str, key: Any) -> Identity:
        settings = self._settings
        try:
            claims = jwt.decode(
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
        except jwt.ExpiredSignatureError:
            raise AuthError("expired", "token has expired") from None
        except jwt.InvalidSignatureError:
            raise AuthError("signature", "token signature is invalid") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError("claims", f"token lacks the {exc.claim!r} claim") from None
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError) as exc:
            raise AuthError("claims", f"token refused: {exc}") from None
        except jwt.PyJWTError as exc:
            raise AuthError("invalid", f"token is invalid: {exc}") from None
        return _identity(claims)


def _identity(claims: dict[str, Any]) -> Identity:
    user, expires = claims.get("sub"), claims.get("exp")
    if not isinstance(user, str) or not user:
        raise AuthError("claims", "token 'sub' must be a non-empty string")
    if not isinstance(expires, int | float) or isinstance(expires, bool):
        raise AuthError("claims", "token 'exp' must be a number")
    try:
        channels = _patterns(claims, "channels")
        publish = _patterns(claims, "publish")
    except InvalidPattern as exc:
        raise AuthError("claims", f"token permission claims are invalid: {exc}") from None
    return Identity(user, expires, channels, publish)


def _patterns(claims: dict[str, Any], name: str) -> PatternSet:
    value = claims.get(name, [])
    if not isinstance(value, list):
        raise InvalidPattern(f"{name!r} must be a list of channel patterns")
    return PatternSet.parse(value)
