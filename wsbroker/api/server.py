"""The HTTP API server: aiohttp's C-parsed HTTP/1.1 on its own port, in the node's loop.

Why a separate port: websockets answers plain HTTP only before an upgrade and
never reads a request body, and an API for backends should be reachable where
browsers are not (``--api-host`` defaults to loopback).

Why aiohttp's low-level server (``aiohttp.web.Server``) rather than its
``Application``: the API has eight fixed paths, so a dict lookup is all the
routing it needs, and skipping the router and middleware chain is a good part
of the throughput budget (README, benchmark ``benchmarks/api_publish.py``).

Every request goes through one pipeline: key (401, before anything else,
nothing else revealed), route (404), method (405), body (415, 413, 408, 400),
the endpoint, and one JSON answer counted in
``wsbroker_api_requests_total{endpoint,status}``. What a client can make cost:

* connections: at most :attr:`ApiServer.max_connections`; beyond it a new
  connection gets a 503 and is closed;
* an idle keep-alive connection, or a new one that never completes its request
  head, is closed after :attr:`ApiServer.keepalive_timeout`;
* a body must arrive within :attr:`ApiServer.body_timeout` and fit
  ``--api-max-body``; a refused body is never read further: the connection is
  closed after the answer instead of draining it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, cast

from aiohttp import web
from aiohttp.web_request import BaseRequest

from wsbroker.api.body import read_json
from wsbroker.api.errors import (
    NOT_FOUND,
    UNAUTHORIZED,
    ApiError,
    error_body,
    method_not_allowed,
    unavailable,
)
from wsbroker.api.keys import ApiKeys
from wsbroker.api.routes import Endpoint, Routes
from wsbroker.backplane import BackplaneUnavailable
from wsbroker.config import Settings
from wsbroker.logs import Throttled
from wsbroker.metrics import Metrics

log = logging.getLogger("wsbroker.api")

JSON = "application/json"
OTHER = "other"

_BUSY_BODY = error_body("unavailable", "the API is at its connection limit; retry shortly")
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\nConnection: close\r\n\r\n"
    + _BUSY_BODY
)


class ApiServer:
    """Serves SPEC §12 on ``--api-host``:``--api-port`` until stopped."""

    max_connections: int = 1024
    """Open API connections; a backend needs a few keep-alive connections, not thousands."""

    keepalive_timeout: float = 30.0
    """Seconds an idle connection (or one that never sends a full request head) stays open."""

    body_timeout: float = 10.0
    """Seconds a request body has to arrive in full."""

    def __init__(self, settings: Settings, routes: Routes, metrics: Metrics) -> None:
        self._settings = settings
        self._keys = ApiKeys(settings.api_key)
        self._endpoints: dict[str, Endpoint] = {e.path: e for e in routes.endpoints()}
        self._max_body = settings.api_max_body
        self._requests = metrics.api_requests
        self._counters: dict[tuple[str, int], Any] = {}
        self._server: web.Server | None = None
        self._listener: asyncio.Server | None = None

    async def start(self) -> None:
        settings = self._settings
        assert settings.api_port is not None
        self._server = web.Server(
            self._handle,
            access_log=None,  # a line per request would cost more than the request
            logger=_HttpErrors(),
            keepalive_timeout=self.keepalive_timeout,
            auto_decompress=False,
            lingering_time=1.0,
        )
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            self._accept, settings.api_host, settings.api_port,
            reuse_port=settings.workers > 1, backlog=1024,
        )
        log.info("HTTP API listening on http://%s:%d/api/ (%d key(s))",
                 settings.api_host, self.port, len(settings.api_key))

    @property
    def port(self) -> int:
        assert self._listener is not None, "API not started"
        port: int = self._listener.sockets[0].getsockname()[1]
        return port

    @property
    def connection_count(self) -> int:
        return len(self._server.connections) if self._server is not None else 0

    async def stop(self) -> None:
        listener, self._listener = self._listener, None
        server, self._server = self._server, None
        if listener is not None:
            listener.close()
        if server is not None:
            await server.shutdown(timeout=1.0)
        if listener is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await listener.wait_closed()

    def _accept(self) -> asyncio.Protocol:
        server = self._server
        if server is None or len(server.connections) >= self.max_connections:
            return _Busy()
        return server()

    async def _handle(self, request: BaseRequest) -> web.StreamResponse:
        endpoint = self._endpoints.get(request.path)
        allow: str | None = None
        try:
            if not self._keys.accepts(request.headers):
                raise UNAUTHORIZED
            if endpoint is None:
                raise NOT_FOUND
            if request.method != endpoint.method:
                allow = endpoint.method
                raise method_not_allowed(endpoint.method)
            if endpoint.method == "POST":
                argument: Any = await read_json(request, self._max_body, self.body_timeout)
            else:
                argument = request.query
            status, body = 200, await endpoint.handle(argument)
        except ApiError as error:
            status, body = error.status, error.body
        except BackplaneUnavailable:
            status, body = 503, unavailable().body
        except Exception:
            log.exception("the API failed on %s %s", request.method, request.path)
            status, body = 500, error_body("internal", "the server failed; see its log")
        response = web.Response(status=status, body=body, content_type=JSON)
        if allow is not None:
            response.headers["Allow"] = allow
        if not request.content.is_eof():
            response.force_close()  # never read what we refused: close instead
        self._count(endpoint.path if endpoint is not None else OTHER, status)
        return response

    def _count(self, endpoint: str, status: int) -> None:
        counter = self._counters.get((endpoint, status))
        if counter is None:
            counter = self._counters[(endpoint, status)] = self._requests.labels(
                endpoint, str(status))
        counter.inc()


class _Busy(asyncio.Protocol):
    """A connection over the limit: a 503, then closed, with no HTTP parsing at all."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        writable = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        writable.write(BUSY_RESPONSE)
        writable.close()



class _HttpErrors(logging.Logger):
    """aiohttp's log of requests it could not parse: a throttled line, never a traceback.

    A client can send malformed HTTP (a bad header, a 10 KiB line, TLS on the
    plain port) at will; aiohttp answers 400 and would log a traceback at ERROR
    each time. The operator should learn that it happens, and how often, not
    read a flood.
    """

    def __init__(self) -> None:
        super().__init__("wsbroker.api.http")
        self.parent = log
        self._throttled = Throttled(log, logging.INFO)

    def exception(self, msg: object, *args: object, exc_info: Any = True,
                  **kwargs: Any) -> None:
        error = exc_info if isinstance(exc_info, BaseException) else None
        detail = getattr(error, "message", None) or type(error).__name__
        self._throttled("answered {count} unreadable HTTP request(s) in 10 s; latest: %s (%s)",
                        str(msg) % args if args else msg, repr(str(detail)[:200]))

    def debug(self, msg: object, *args: object, exc_info: Any = None, **kwargs: Any) -> None:
        super().debug(msg, *args, **kwargs)  # TLS on the plain port: no traceback either
