"""A wsbroker node: the websockets server, its handshake rules and its graceful drain.

The handshake decides everything that can be decided before a WebSocket
exists (route, origin, capacity, a token given in the header or URL), so a
refused client gets a plain HTTP answer and costs no connection state.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
import time
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from wsbroker import http
from wsbroker.api import ApiServer, create_api
from wsbroker.auth import AuthError, Identity, Verifier
from wsbroker.backplane import Backplane, create_backplane
from wsbroker.batching import FlushScheduler
from wsbroker.config import Settings
from wsbroker.control import Control
from wsbroker.hub import Hub
from wsbroker.logs import Throttled
from wsbroker.metrics import CONTENT_TYPE, Metrics
from wsbroker.outbox import CLOSE_TIMEOUT, Connection
from wsbroker.presence import PresenceService
from wsbroker.registry import NodeReport, create_registry, open_redis, uptime_since
from wsbroker.session import CLOSE_DISCONNECTED, CLOSE_SERVICE_RESTART, NodeServices, Session
from wsbroker.tasks import cancel_and_wait

if TYPE_CHECKING:
    from wsbroker.webhooks.service import Webhooks

log = logging.getLogger("wsbroker.server")

PING_INTERVAL = 20.0
PING_TIMEOUT = 20.0
UNBOUNDED_WRITE_LIMIT = 1 << 30  # uvloop takes a C int
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
        self.draining = False
        self._admitted: set[ServerConnection] = set()
        self._handshake_identity: dict[ServerConnection, Identity] = {}
        self._trusted_proxies = _parse_networks(settings.trusted_proxies)
        self._backplane_seen_down = False
        self._server: Server | None = None
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
        self._server = await serve(
            self._serve_connection,
            settings.host,
            settings.port,
            process_request=self._process_request,
            create_connection=Connection,
            compression="deflate" if settings.compression else None,
            max_size=settings.max_message_size,
            ping_interval=PING_INTERVAL,
            ping_timeout=PING_TIMEOUT,
            close_timeout=CLOSE_TIMEOUT,
            # Our frames bypass websockets' flow control (each session's Outbox
            # bounds its client by --max-send-buffer, websockets' own PONGs
            # included), and websockets' own control frames must never wait for
            # the buffer to drain, or a client that stopped reading would stall
            # its keepalive ping forever instead of timing out.
            write_limit=UNBOUNDED_WRITE_LIMIT,
            server_header="wsbroker",
            ssl=_tls_context(settings),
            reuse_port=settings.workers > 1,
        )
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
        closing = [connection.connection_lost_waiter for connection in self._admitted]
        if closing:
            await asyncio.wait(closing, timeout=CLOSE_TIMEOUT + 1)
        if self.webhooks is not None:  # pending webhooks get the rest of the drain time
            await self.webhooks.drain(max(started + spread, loop.time() + WEBHOOK_FLUSH_MIN))
        await self.stop()

    async def stop(self) -> None:
        """Close everything now (clients still connected get 1001 from websockets)."""
        self.draining = True
        if self.api is not None:
            await self.api.stop()
        await self.registry.stop()
        await cancel_and_wait(self._control_task)
        if self._server is not None:
            self._server.close()
        # Subscribes still waiting on the backplane end now, so their sessions
        # can finish closing instead of holding the shutdown up.
        await self.hub.close()
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
        return NodeReport(self.settings.node_id, len(self._admitted),
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

    # -- handshake ---------------------------------------------------------------

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        for name in SINGLE_HEADERS:
            if len(request.headers.get_all(name)) > 1:
                return http.text(400, f"the {name} header must appear once")
        path, _, query = request.path.partition("?")
        is_upgrade = "websocket" in request.headers.get("Upgrade", "").lower()
        if path == "/ws":
            if not is_upgrade:
                return http.upgrade_required()
            return await self._admit(connection, request, query)
        if is_upgrade:
            return http.text(404, "WebSocket endpoint is /ws")
        return self._http_route(path, request)

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

    async def _admit(
        self, connection: ServerConnection, request: Request, query: str
    ) -> Response | None:
        response = await self._handshake_verdict(connection, request, query)
        if response is not None:
            self._log_refusal(
                "refused {count} upgrade(s) in the last 10 s; latest: %d from %s: %s",
                response.status_code, self.client_address(connection),
                response.body.decode(errors="replace").strip(),
            )
        return response

    async def _handshake_verdict(
        self, connection: ServerConnection, request: Request, query: str
    ) -> Response | None:
        """None to upgrade, or the HTTP answer that refuses the upgrade."""
        settings = self.settings
        if self.draining:
            return http.text(503, "node is shutting down; connect again")
        origin = request.headers.get("Origin")
        if settings.allowed_origins and origin is not None and (
            origin not in settings.allowed_origins
        ):
            return http.text(403, "origin not allowed")
        if settings.max_connections and len(self._admitted) >= settings.max_connections:
            return http.text(503, "node is at its connection limit; try another")
        # Counted before any await: handshakes waiting on a slow key fetch hold
        # their place, so --max-connections stays exact.
        self._admitted.add(connection)
        self.metrics.connections.set(len(self._admitted))
        token = _handshake_token(request, query)
        if token is not None:
            try:
                identity = await self.verifier.verify(token)
            except AuthError as exc:
                self._forget(connection)
                self.metrics.auth_failures.labels(exc.reason).inc()
                return http.text(401, str(exc))
            except BaseException:
                self._forget(connection)
                raise
            self._handshake_identity[connection] = identity
        connection.connection_lost_waiter.add_done_callback(
            lambda _: self._forget(connection)
        )
        return None

    def _forget(self, connection: ServerConnection) -> None:
        self._admitted.discard(connection)
        self.metrics.connections.set(len(self._admitted))
        self._handshake_identity.pop(connection, None)

    async def _serve_connection(self, connection: ServerConnection) -> None:
        identity = self._handshake_identity.pop(connection, None)
        session = Session(self.services, connection, identity, self.client_address(connection))
        self.sessions.add(session)
        if self.draining:  # its handshake was in flight when the drain began
            session.close_soon(CLOSE_SERVICE_RESTART, "service restart")
        try:
            await session.run()
        finally:
            self.sessions.discard(session)

    def client_address(self, connection: ServerConnection) -> str:
        """The peer address, or the X-Forwarded-For client when the peer is a trusted proxy."""
        peer = connection.remote_address[0] if connection.remote_address else "?"
        request = connection.request
        if self._trusted_proxies and request is not None and _in_networks(
            peer, self._trusted_proxies
        ):
            forwarded = ",".join(request.headers.get_all("X-Forwarded-For"))
            if forwarded:
                # The nearest hop not ours is the client: walk from the right.
                for hop in reversed([part.strip() for part in forwarded.split(",")]):
                    if not _in_networks(hop, self._trusted_proxies):
                        return hop
        return str(peer)


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
