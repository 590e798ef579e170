"""Prometheus metrics: every name the node exports, in one registry per node.

A registry per node (rather than the global default) lets tests run several
nodes in one process and keeps ``/metrics`` to what this node measured.

With ``--workers N`` each worker is its own process behind one port, and a
scrape lands on any of them; so workers run prometheus-client's multiprocess
mode (``PROMETHEUS_MULTIPROC_DIR``, set by the parent) and every worker's
``/metrics`` reports the sum over all live workers: counters and histograms
add up, the live gauges are summed, ``backplane_up`` is the minimum.
"""

from __future__ import annotations

import asyncio

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    exposition,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

CONTENT_TYPE = exposition.CONTENT_TYPE_LATEST

FANOUT_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                  0.1, 0.25, 1.0)

FANOUT_SAMPLE_EVERY = 8
"""``wsbroker_fanout_seconds`` times one message in this many (the first one
included): its quantiles and mean are those of all messages, its ``_count`` is
not the number of messages (``wsbroker_messages_received_total`` is)."""


class Tally:
    """Per-message counts as plain integers, folded into Prometheus once per loop turn.

    prometheus-client takes a lock for every increment; on the fan-out path,
    where a message to a one-subscriber channel costs a few microseconds in
    all, two or three increments per message were about a tenth of it. Here a
    message costs an integer add, and the totals reach the real counters at
    the end of the loop turn, so a scrape (which runs in a later turn) never
    sees them late.
    """

    __slots__ = ("_delivered", "_metrics", "_received", "_scheduled", "clock")

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._received = 0
        self._delivered = 0
        self._scheduled = False
        self.clock = 0
        """Messages received, ever: picks the ones whose fan-out is timed."""

    def received(self) -> bool:
        """Count one backplane message; True if its fan-out is to be timed."""
        self._received += 1
        self.clock += 1
        if not self._scheduled:
            self._schedule()
        return self.clock % FANOUT_SAMPLE_EVERY == 1

    def delivered(self, count: int) -> None:
        """Count ``count`` frames handed to clients."""
        self._delivered += count
        if not self._scheduled:
            self._schedule()

    def _schedule(self) -> None:
        self._scheduled = True
        asyncio.get_running_loop().call_soon(self.fold)

    def fold(self) -> None:
        """Add what was counted since the last fold to the Prometheus counters."""
        self._scheduled = False
        if self._received:
            self._metrics.messages_received.inc(self._received)
            self._received = 0
        if self._delivered:
            self._metrics.messages_delivered.inc(self._delivered)
            self._delivered = 0


class Metrics:
    """The node's instruments; ``render()`` is the body of ``/metrics``."""

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._multiprocess_dir = multiprocess_dir
        r = self.registry
        self.connections = Gauge("wsbroker_connections", "Open WebSocket connections.",
                                 registry=r, multiprocess_mode="livesum")
        self.subscriptions = Gauge("wsbroker_subscriptions",
                                   "Client subscriptions on this node.", registry=r,
                                   multiprocess_mode="livesum")
        self.channels = Gauge("wsbroker_channels", "Channels with local subscribers.",
                              registry=r, multiprocess_mode="livesum")
        self.messages_received = Counter(
            "wsbroker_messages_received", "Messages received from the backplane.", registry=r)
        self.messages_delivered = Counter(
            "wsbroker_messages_delivered", "Message frames written to clients.", registry=r)
        self.messages_dropped = Counter(
            "wsbroker_messages_dropped", "Messages not delivered, by reason.", ["reason"],
            registry=r)
        self.auth_failures = Counter(
            "wsbroker_auth_failures", "Refused tokens, by reason.", ["reason"], registry=r)
        self.disconnects = Counter(
            "wsbroker_disconnects", "Closed connections, by close code.", ["code"], registry=r)
        self.backplane_reconnects = Counter(
            "wsbroker_backplane_reconnects", "Times the backplane came back after a loss.",
            registry=r)
        self.backplane_up = Gauge("wsbroker_backplane_up", "1 while the backplane is up.",
                                  registry=r, multiprocess_mode="livemin")
        self.recoveries = Counter(
            "wsbroker_recoveries", "History recoveries: a client's subscribe with since "
            "(recovered, not_recovered) or this node reading a gap (node_recovered, node_lost).",
            ["result"], registry=r)
        self.presence_members = Gauge(
            "wsbroker_presence_members",
            "Presence members this node holds (its subscriptions on --presence channels).",
            registry=r, multiprocess_mode="livesum")
        self.fanout_seconds = Histogram(
            "wsbroker_fanout_seconds", "Time to fan one message out to local subscribers "
            f"(one message in {FANOUT_SAMPLE_EVERY} is timed).",
            buckets=FANOUT_BUCKETS, registry=r)
        self.webhook_requests = Counter(
            "wsbroker_webhook_requests", "Webhook request attempts, by result.", ["result"],
            registry=r)
        self.webhook_events_dropped = Counter(
            "wsbroker_webhook_events_dropped", "Webhook events never delivered, by reason.",
            ["reason"], registry=r)
        self.api_requests = Counter(
            "wsbroker_api_requests", "HTTP API requests, by endpoint path (or 'other') and "
            "status code.", ["endpoint", "status"], registry=r)

        self.tally = Tally(self)
        """The fan-out path's counts (:class:`Tally`); nothing else needs it."""

    def render(self) -> bytes:
        self.tally.fold()
        if self._multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self._multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
