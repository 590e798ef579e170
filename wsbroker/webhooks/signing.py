"""Standard Webhooks signatures: what the node sends and what a receiver checks.

A request carries ``webhook-id``, ``webhook-timestamp`` (Unix seconds) and
``webhook-signature``: one ``v1,<base64 HMAC-SHA256>`` entry per secret,
space-separated, over ``<id>.<timestamp>.<body>``. The HMAC key is the
base64-decoded part of a ``whsec_…`` secret. Several secrets give several
entries, so a receiver can rotate its secret without losing a request: it
accepts when any entry matches any secret it knows.

The timestamp is signed and checked against a tolerance (5 minutes by
default), so a captured request cannot be replayed later.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping, Sequence

SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE = 300.0
"""Seconds a ``webhook-timestamp`` may differ from the receiver's clock."""


class WebhookVerificationError(ValueError):
    """The request is not a genuine, fresh webhook from a holder of the secret."""


def decode_secret(secret: str) -> bytes:
    """``whsec_<base64>`` → the HMAC key; ValueError for anything else."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("a webhook secret starts with whsec_ followed by base64")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except binascii.Error:
        raise ValueError("the part of a webhook secret after whsec_ must be base64") from None
    if len(key) < 16:
        raise ValueError("a webhook secret must hold at least 16 bytes (24 base64 characters)")
    return key


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` entry for ``key``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def sign(keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers for one attempt at delivering ``body``."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signature(key, msg_id, timestamp, body) for key in keys),
    }


def verify(
    secret: str | Iterable[str],
    headers: Mapping[str, str],
    body: bytes | str,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> None:
    """Check a webhook request; return quietly or raise :class:`WebhookVerificationError`.

    ``secret`` is one ``whsec_…`` secret or several (while rotating);
    ``headers`` any mapping of the request's headers (looked up
    case-insensitively); ``body`` the raw request body, exactly as received
    (verify before parsing it). Raises when a header is missing, the
    timestamp is more than ``tolerance`` seconds away from ``now``, or no
    signature entry matches any secret.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    try:
        msg_id = lowered["webhook-id"]
        stamp = lowered["webhook-timestamp"]
        signatures = lowered["webhook-signature"]
    except KeyError as exc:
        raise WebhookVerificationError(f"missing header {exc.args[0]}") from None
    try:
        timestamp = int(stamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not a Unix time") from None
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise WebhookVerificationError(
            f"webhook-timestamp is {current - timestamp:+.0f} s away from now "
            f"(more than {tolerance:.0f} s): a replay, or a clock that is off"
        )
    raw = body.encode() if isinstance(body, str) else bytes(body)
    secrets = [secret] if isinstance(secret, str) else list(secret)
    try:
        expected = [signature(decode_secret(item), msg_id, timestamp, raw) for item in secrets]
    except ValueError as exc:
        raise WebhookVerificationError(f"bad secret: {exc}") from None
    offered = [entry for entry in signatures.split(" ") if entry.startswith("v1,")]
    for entry in offered:
        if any(hmac.compare_digest(entry.encode(), good.encode()) for good in expected):
            return
    raise WebhookVerificationError("no webhook-signature entry matches the secret")
