"""Plain HTTP answers served on the WebSocket port: probes, metrics, the demo page.

websockets hands us every request before the upgrade; anything that is not a
WebSocket upgrade at ``/ws`` is answered here with a complete response.
"""

from __future__ import annotations

import email.utils
import functools
import http
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
