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
        self.fanout_seconds = Histogram(
            "wsbroker_fanout_seconds", "Time to fan one message out to local subscribers.",
            buckets=FANOUT_BUCKETS, registry=r)

    def render(self) -> bytes:
        if self._multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self._multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
