"""Plain HTTP answers served on the WebSocket port: probes, metrics, the demo page,
the browser client.

websockets hands us every request before the upgrade; anything that is not a
WebSocket upgrade at ``/ws`` is answered here with a complete response.
"""

from __future__ import annotations

import base64
import email.utils
import functools
import hashlib
import http
from dataclasses import dataclass
from importlib import resources

from websockets.datastructures import Headers
from websockets.http11 import Response

TEXT = "text/plain; charset=utf-8"
HTML = "text/html; charset=utf-8"


def respond(status: int, body: bytes | str, content_type: str = TEXT) -> Response:
    """A complete response that closes the HTTP connection after it is sent."""
    status_ = http.HTTPStatus(status)
    data = body.encode() if isinstance(body, str) else body
    headers = Headers([
        ("Date", email.utils.formatdate(usegmt=True)),
        ("Connection", "close"),
        ("Content-Length", str(len(data))),
        ("Content-Type", content_type),
        ("Cache-Control", "no-store"),
    ])
    return Response(status_.value, status_.phrase, headers, data)


def text(status: int, message: str) -> Response:
    """A one-line plain-text answer, as the SPEC asks for refused upgrades."""
    return respond(status, message.rstrip("\n") + "\n")


def upgrade_required() -> Response:
    response = text(426, "this endpoint speaks WebSocket: send an Upgrade request")
    response.headers["Upgrade"] = "websocket"
    return response


@functools.cache
def demo_page() -> bytes:
    """The dev-mode demo page, read once from the package."""
    return resources.files("wsbroker").joinpath("static/demo.html").read_bytes()


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str


CLIENT_FILES = {
    "/wsbroker.js": ("static/wsbroker.js", "text/javascript; charset=utf-8"),
    "/wsbroker.d.ts": ("static/wsbroker.d.ts", "application/typescript; charset=utf-8"),
}
"""The browser client (SPEC §14): one source, in the package; clients/js links to it."""

CLIENT_CACHE_CONTROL = "public, no-cache"
"""Cache, but revalidate on every use: a 304 costs little, and a rolling upgrade
never leaves a page running last version's client against this version's node."""


@functools.cache
def client_file(path: str) -> StaticFile:
    """A browser-client file, read and hashed once from the package."""
    name, content_type = CLIENT_FILES[path]
    body = resources.files("wsbroker").joinpath(name).read_bytes()
    digest = base64.urlsafe_b64encode(hashlib.sha256(body).digest()[:16]).rstrip(b"=")
    return StaticFile(body, content_type, f'"{digest.decode()}"')


def serve_client_file(path: str, if_none_match: str | None) -> Response:
    """``GET /wsbroker.js`` and ``/wsbroker.d.ts``: cacheable, importable from any origin."""
    file = client_file(path)
    headers = Headers([
        ("Date", email.utils.formatdate(usegmt=True)),
        ("Connection", "close"),
        ("ETag", file.etag),
        ("Cache-Control", CLIENT_CACHE_CONTROL),
        ("Access-Control-Allow-Origin", "*"),
    ])
    if if_none_match is not None and _etag_matches(if_none_match, file.etag):
        return Response(304, "Not Modified", headers)
    headers["Content-Length"] = str(len(file.body))
    headers["Content-Type"] = file.content_type
    headers["X-Content-Type-Options"] = "nosniff"
    return Response(200, "OK", headers, file.body)


def _etag_matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110's weak comparison: ``*``, or any listed tag equal to ours, ``W/`` or not."""
    tags = [tag.strip() for tag in if_none_match.split(",")]
    return "*" in tags or any(tag.removeprefix("W/") == etag for tag in tags)
