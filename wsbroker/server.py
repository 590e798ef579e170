"""A wsbroker node: its listening socket, its handshake rules and its graceful drain.

The handshake decides everything that can be decided before a WebSocket
exists (route, origin, capacity, a token given in the header or URL), so a
refused client gets a plain HTTP answer and costs no connection state.
Connections are served on websockets' Sans-I/O protocol (connection.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
import time
from collections.abc import Awaitable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from websockets.extensions.permessage_deflate import enable_server_permessage_deflate
from websockets.http11 import Request, Response

from wsbroker import http
from wsbroker.api import ApiServer, create_api
from wsbroker.auth import AuthError, Verifier
from wsbroker.backplane import Backplane, create_backplane
from wsbroker.batching import FlushScheduler
from wsbroker.config import Settings
from wsbroker.connection import CLOSE_TIMEOUT, ClientConnection, ConnectionOptions, Verdict
from wsbroker.control import Control
from wsbroker.hub import Hub
from wsbroker.keepalive import Keepalive
from wsbroker.logs import Throttled
from wsbroker.metrics import CONTENT_TYPE, Metrics
from wsbroker.presence import PresenceService
from wsbroker.registry import NodeReport, create_registry, open_redis, uptime_since
from wsbroker.session import CLOSE_DISCONNECTED, CLOSE_SERVICE_RESTART, NodeServices, Session
from wsbroker.tasks import cancel_and_wait

if TYPE_CHECKING:
    from wsbroker.webhooks.service import Webhooks

log = logging.getLogger("wsbroker.server")

LISTEN_BACKLOG = 511
"""Connections the kernel holds for us while the loop is busy (Node's default too)."""
SINGLE_HEADERS = ("Upgrade", "Origin", "Authorization")
"""Headers we read one value of: a request repeating one is refused with 400."""
WEBHOOK_FLUSH_MIN = 1.0
"""Seconds webhooks get at the end of a drain even when the closes used all of it."""


class Node:
    """One wsbroker node. Use ``async with Node(settings) as node`` or start/drain."""

    def __init__(
        self,
        settings: Settings,
        backplane: Backplane | None = None,
        metrics_dir: str | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = Metrics(metrics_dir)
        self.backplane = backplane if backplane is not None else create_backplane(settings)
        self.webhooks = _webhooks(settings, self.metrics)
        self.hub = Hub(self.backplane, self.metrics, settings.history,
                       replay_budget=settings.max_send_buffer, observer=self.webhooks)
        self.verifier = Verifier(settings)
        self.presence = PresenceService(settings, self.backplane, self.metrics,
                                        observer=self.webhooks)
        """Members of --presence channels; the HTTP API reads it too (members, stats)."""
        self.services = NodeServices(
            settings, self.hub, self.backplane, self.verifier, self.metrics, FlushScheduler(),
            self.presence, self.webhooks,
        )
        self.sessions: set[Session] = set()
        self._no_sessions = asyncio.Event()
        self._no_sessions.set()
        self.draining = False
        self._admitted = 0
        """Connections past the handshake's checks (``connection.admitted``), until lost."""
        self._connections: set[ClientConnection] = set()
        """Every connection from accept to connection_lost."""
        self._keepalive = Keepalive(self._connections)
        self._trusted_proxies = _parse_networks(settings.trusted_proxies)
        self._backplane_seen_down = False
        self._server: asyncio.Server | None = None
        self._log_refusal = Throttled(log, logging.INFO)
        # The fleet services the HTTP API stands on; every node runs them, API or not.
        self._started_at = time.monotonic()
        self.control = Control(self.hub, self.backplane, self.disconnect_user)
        self._redis = open_redis(settings) if settings.redis_url else None
        self.registry = create_registry(settings, self._redis, self.report,
                                        self.hub.channel_names)
        self.api: ApiServer | None = None
        self._control_task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        settings = self.settings
        self.backplane.bind(self.hub.on_message, self._on_backplane_state, self.hub.resync)
        await self.backplane.start()
        self.verifier.start()  # a JWKS is fetched now; /readyz waits for it
        await self.presence.start()
        if self.webhooks is not None:
            await self.webhooks.start()
        await self.control.listen()  # or, if the backplane is down, once it is up
        await self.registry.start()
        # websockets' defaults for the extension (12-bit windows, memLevel 5).
        extensions = enable_server_permessage_deflate(None) if settings.compression else []
        options = ConnectionOptions(settings.max_message_size, extensions)
        self._server = await asyncio.get_running_loop().create_server(
            lambda: ClientConnection(self, options),
            settings.host,
            settings.port,
            ssl=_tls_context(settings),
            reuse_port=settings.workers > 1,
            backlog=LISTEN_BACKLOG,
        )
        self._keepalive.start()
        if settings.api_port is not None:
            self.api = create_api(settings, self.hub, self.control, self.registry,
                                  self.presence, self._redis, self.metrics)
            await self.api.start()
        log.info("node %s listening on %s://%s:%d/ws (backplane: %s)",
                 settings.node_id, "wss" if settings.tls_cert else "ws", settings.host,
                 self.port, type(self.backplane).__name__)

    @property
    def port(self) -> int:
        assert self._server is not None, "node not started"
        port: int = next(iter(self._server.sockets)).getsockname()[1]
        return port

    @property
    def ready(self) -> bool:
        return self.backplane.is_up and self.verifier.ready and not self.draining

    async def drain(self) -> None:
        """Graceful shutdown (SPEC §8): refuse new clients, close old ones with 1012
        spread over ``--drain-seconds`` so they do not all reconnect at once, stop.

        A handshake still in flight (a slow key fetch) completes and is closed
        with 1012 too, and the drain waits for it.
        """
        self.draining = True
        sessions = list(self.sessions)
        spread = self.settings.drain_seconds
        log.info("draining %d clients over %.1fs", len(sessions), spread)
        loop = asyncio.get_running_loop()
        started = loop.time()
        for index, session in enumerate(sessions):
            due = started + spread * index / len(sessions)
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            session.close_soon(CLOSE_SERVICE_RESTART, "service restart")
        closing = [asyncio.ensure_future(connection.wait_lost())
                   for connection in self._connections if connection.admitted]
        if closing:
            await asyncio.wait(closing, timeout=CLOSE_TIMEOUT + 1)
            for waiter in closing:
                waiter.cancel()
        if self.webhooks is not None:  # pending webhooks get the rest of the drain time
            await self.webhooks.drain(max(started + spread, loop.time() + WEBHOOK_FLUSH_MIN))
        await self.stop()

    async def stop(self) -> None:
        """Close everything now (clients still connected get 1001, going away)."""
        self.draining = True
        if self.api is not None:
            await self.api.stop()
        await self.registry.stop()
        await cancel_and_wait(self._control_task)
        if self._server is not None:
            self._server.close()
        await self._keepalive.stop()
        self.services.expiries.close()
        for connection in list(self._connections):
            connection.close(1001, "")
        # Subscribes still waiting on the backplane end now, so their sessions
        # can finish closing instead of holding the shutdown up.
        await self.hub.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT + 1):
                await asyncio.gather(*(connection.wait_lost()
                                       for connection in list(self._connections)))
        for connection in list(self._connections):
            connection.transport.abort()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT + 1):
                await self._no_sessions.wait()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT + 1):
                    await self._server.wait_closed()
        await self.verifier.stop()
        await self.presence.stop()
        if self.webhooks is not None:
            await self.webhooks.close()
        await self.backplane.stop()
        self.metrics.connections.set(0)
        self.metrics.backplane_up.set(0)
        if self._redis is not None:
            await self._redis.aclose()
        log.info("node %s stopped", self.settings.node_id)

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def disconnect_user(self, user: str) -> int:
        """Close every connection of ``user`` on this node with 4003; returns how many."""
        closing = [session for session in self.sessions
                   if session.identity is not None and session.identity.user == user]
        for session in closing:
            session.close_soon(CLOSE_DISCONNECTED, "disconnected by the operator")
        return len(closing)

    def report(self) -> NodeReport:
        """This node as ``/api/info`` shows it."""
        return NodeReport(self.settings.node_id, self._admitted,
                          self.hub.subscription_count, self.hub.channel_count,
                          uptime_since(self._started_at))

    def _on_backplane_state(self, up: bool) -> None:
        self.metrics.backplane_up.set(1 if up else 0)
        if up and not self.control.listening and not self.draining:
            self._control_task = asyncio.ensure_future(self.control.listen())
        if not up:
            self._backplane_seen_down = True
            log.warning("backplane down: /readyz is 503 until it is back")
        elif self._backplane_seen_down:
            self.metrics.backplane_reconnects.inc()
            log.info("backplane back up")

    # -- connections (connection.Gate) -------------------------------------------

    def handshake(self, connection: ClientConnection,
                  request: Request) -> Verdict | Awaitable[Verdict]:
        """Accept (None) or refuse (a response) an upgrade, or answer a plain request."""
        for name in SINGLE_HEADERS:
            if len(request.headers.get_all(name)) > 1:
                return http.text(400, f"the {name} header must appear once")
        path, _, query = request.path.partition("?")
        is_upgrade = "websocket" in request.headers.get("Upgrade", "").lower()
        if path == "/ws":
            if not is_upgrade:
                return http.upgrade_required()
            connection.address = self.client_address(connection.address, request)
            return self._admit(connection, request, query)
        if is_upgrade:
            return http.text(404, "WebSocket endpoint is /ws")
        return self._http_route(path, request)

    def open(self, connection: ClientConnection) -> Session:
        session = Session(self.services, connection, self._session_finished)
        self.sessions.add(session)
        self._no_sessions.clear()
        session.start()
        if self.draining:  # its handshake was in flight when the drain began
            session.close_soon(CLOSE_SERVICE_RESTART, "service restart")
        return session

    def closed(self, connection: ClientConnection) -> None:
        self._connections.discard(connection)
        self._unadmit(connection)

    def connected(self, connection: ClientConnection) -> None:
        self._connections.add(connection)

    def _unadmit(self, connection: ClientConnection) -> None:
        if connection.admitted:
            connection.admitted = False
            self._admitted -= 1
            self.metrics.connections.set(self._admitted)

    def _session_finished(self, session: Session) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            self._no_sessions.set()

    def _http_route(self, path: str, request: Request) -> Response:
        if path in http.CLIENT_FILES:
            return http.serve_client_file(path, request.headers.get("If-None-Match"))
        if path == "/healthz":
            return http.text(200, "ok")
        if path == "/readyz":
            if self.ready:
                return http.text(200, "ready")
            return http.text(503, "draining" if self.draining else
                             "no JWKS keys yet" if not self.verifier.ready else
                             "backplane unavailable")
        if path == "/metrics":
            return http.respond(200, self.metrics.render(), CONTENT_TYPE)
        if path == "/" and self.settings.dev:
            return http.respond(200, http.demo_page(), http.HTML)
        return http.text(404, "not found")

    def _admit(self, connection: ClientConnection, request: Request,
               query: str) -> Verdict | Awaitable[Verdict]:
        """Decide an upgrade: at once when it can be, else once its token's key is in."""
        refusal = self._refusal(connection, request)
        if refusal is not None:
            return self._refused(connection, refusal)
        token = _handshake_token(request, query)
        if token is None:
            return None
        try:
            identity = self.verifier.verify_now(token)
        except AuthError as exc:
            return self._refused(connection, self._unauthorized(connection, exc))
        if identity is not None:
            connection.identity = identity
            return None
        return self._admit_later(connection, token)

    async def _admit_later(self, connection: ClientConnection, token: str) -> Response | None:
        try:
            connection.identity = await self.verifier.verify(token)
        except AuthError as exc:
            return self._refused(connection, self._unauthorized(connection, exc))
        return None

    def _refusal(self, connection: ClientConnection, request: Request) -> Response | None:
        """The answer that refuses this upgrade before its token is looked at, if any."""
        settings = self.settings
        if self.draining:
            return http.text(503, "node is shutting down; connect again")
        origin = request.headers.get("Origin")
        if settings.allowed_origins and origin is not None and (
            origin not in settings.allowed_origins
        ):
            return http.text(403, "origin not allowed")
        if settings.max_connections and self._admitted >= settings.max_connections:
            return http.text(503, "node is at its connection limit; try another")
        # Counted before any await: handshakes waiting on a slow key fetch hold
        # their place, so --max-connections stays exact.
        connection.admitted = True
        self._admitted += 1
        self.metrics.connections.set(self._admitted)
        return None

    def _unauthorized(self, connection: ClientConnection, error: AuthError) -> Response:
        self._unadmit(connection)
        self.metrics.auth_failures.labels(error.reason).inc()
        return http.text(401, str(error))

    def _refused(self, connection: ClientConnection, response: Response) -> Response:
        self._log_refusal(
            "refused {count} upgrade(s) in the last 10 s; latest: %d from %s: %s",
            response.status_code, connection.address,
            response.body.decode(errors="replace").strip(),
        )
        return response

    def client_address(self, peer: str, request: Request) -> str:
        """The peer address, or the X-Forwarded-For client when the peer is a trusted proxy."""
        if self._trusted_proxies and _in_networks(peer, self._trusted_proxies):
            forwarded = ",".join(request.headers.get_all("X-Forwarded-For"))
            if forwarded:
                # The nearest hop not ours is the client: walk from the right.
                for hop in reversed([part.strip() for part in forwarded.split(",")]):
                    if not _in_networks(hop, self._trusted_proxies):
                        return hop
        return peer


def _webhooks(settings: Settings, metrics: Metrics) -> Webhooks | None:
    """The webhook service when ``--webhook-url`` is set (imported only then)."""
    if not settings.webhook_url:
        return None
    from wsbroker.webhooks.service import Webhooks

    return Webhooks(settings, metrics)


def _handshake_token(request: Request, query: str) -> str | None:
    authorization = request.headers.get("Authorization")
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    values = parse_qs(query).get("token") if query else None
    return values[0] if values else None


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _parse_networks(texts: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(text, strict=False) for text in texts)


def _in_networks(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    if not settings.tls_cert or not settings.tls_key:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context
