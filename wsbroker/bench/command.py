"""``wsbroker bench``: load a deployment the way production would, and report.

N authenticated subscribers connect to the URL (through whatever load
balancer, TLS included, it names), spread over K channels; a publisher sends
benchmark messages through Redis at a steady rate; the report says how fast
clients connected, how many deliveries arrived and how late, and whether any
were lost or duplicated. Subscribers and publisher share this process (and
its clock), so latency is publish → receive on one clock.

Exit status: 0 when every expected delivery arrived exactly once, 1 when some
were lost or duplicated or no subscriber could connect, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import resource
import secrets
import ssl
import sys
import time
from typing import Any

import aiohttp
import jwt
import orjson

from wsbroker.bench.progress import Progress
from wsbroker.bench.publishers import (
    ApiPublisher,
    Published,
    Publisher,
    PublishFailed,
    RedisPublisher,
    publish_paced,
)
from wsbroker.bench.subscribers import Audience, Endpoint, connect_all, step_report
from wsbroker.redis_errors import REDIS_FAILURES

PUBLISH_FAILURES: tuple[type[Exception], ...] = (
    PublishFailed, aiohttp.ClientError, *REDIS_FAILURES)
"""What a publisher that cannot reach its backend raises: the run ends, without figures."""

DRAIN_SECONDS = 5.0
"""How long deliveries may trail the last publish before the rest count as lost."""


def configure(parser: argparse.ArgumentParser) -> None:
    """The command's arguments (``cli.py`` owns the parser, this module its meaning)."""
    parser.add_argument("url", help="WebSocket URL of the deployment, e.g. wss://host/ws")
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--token", default=None,
                     help="one token for every subscriber; it must allow the bench "
                          "channels [WSB_TOKEN]")
    who.add_argument("--jwt-secret", default=None,
                     help="mint an HS256 token per subscriber instead [WSB_JWT_SECRET]")
    parser.add_argument("--redis-url", default=None,
                        help="publish through this Redis, as a backend does [WSB_REDIS_URL]")
    parser.add_argument("--api-url", default=None,
                        help="publish through this node's HTTP API instead, e.g. "
                             "http://127.0.0.1:8766 [WSB_API_URL]")
    parser.add_argument("--api-key", default=None, help="key for --api-url [WSB_API_KEY]")
    parser.add_argument("--redis-prefix", default=None, help="[WSB_REDIS_PREFIX, default ws:]")
    parser.add_argument("--redis-cluster", action="store_true", default=None,
                        help="the Redis URL names a Redis Cluster node [WSB_REDIS_CLUSTER]")
    parser.add_argument("--subscribers", type=int, default=1000, metavar="N")
    parser.add_argument("--channels", type=int, default=1, metavar="K",
                        help="subscribers are spread evenly over K channels")
    parser.add_argument("--rate", type=float, default=100.0, metavar="MSGS_PER_S",
                        help="messages published per second, all channels together")
    parser.add_argument("--duration", default="10s", help="publishing time (default 10s)")
    parser.add_argument("--message-size", type=int, default=100, metavar="B",
                        help="payload bytes per message (default 100)")
    parser.add_argument("--channel-prefix", default="bench",
                        help="channels are PREFIX.<run id>.<i> (default bench)")
    parser.add_argument("--concurrency", type=int, default=100,
                        help="handshakes in flight at once (default 100)")
    parser.add_argument("--ca-file", default=None,
                        help="PEM CA bundle to verify a wss:// server with")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


class UsageError(ValueError):
    """The arguments cannot make a run; the message says what to change."""


def run(args: argparse.Namespace, environ: dict[str, str] | None = None) -> int:
    """Validate, run on uvloop when installed, print the report; the exit status."""
    from wsbroker.config import parse_duration

    env = dict(os.environ if environ is None else environ)
    settings = _Run(
        url=args.url,
        token=args.token or (None if args.jwt_secret else env.get("WSB_TOKEN")),
        jwt_secret=args.jwt_secret or (None if args.token else env.get("WSB_JWT_SECRET")),
        redis_url=args.redis_url or env.get("WSB_REDIS_URL"),
        api_url=args.api_url or env.get("WSB_API_URL"),
        api_key=args.api_key or env.get("WSB_API_KEY"),
        redis_prefix=args.redis_prefix or env.get("WSB_REDIS_PREFIX") or "ws:",
        redis_cluster=bool(args.redis_cluster)
        or env.get("WSB_REDIS_CLUSTER", "").lower() in ("1", "true", "yes", "on"),
        subscribers=args.subscribers,
        channels=args.channels,
        rate=args.rate,
        duration=parse_duration(args.duration),
        size=args.message_size,
        name=f"{args.channel_prefix}.{secrets.token_hex(3)}",
        concurrency=args.concurrency,
        ca_file=args.ca_file,
    )
    settings.check()
    _raise_fd_limit(settings.subscribers)
    runner: Any = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    try:
        report = runner(settings.measure())
    except PUBLISH_FAILURES as exc:
        print(f"wsbroker bench: publishing failed, no figures: {exc}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print(render(report))
    failed = (report["deliveries"]["lost"] or report["deliveries"]["duplicated"]
              or not report["connect"]["subscribed"])
    return 1 if failed else 0


class _Run:
    """One bench run's settings, and the run itself."""

    def __init__(self, *, url: str, token: str | None, jwt_secret: str | None,
                 redis_url: str | None, api_url: str | None, api_key: str | None,
                 redis_prefix: str, redis_cluster: bool,
                 subscribers: int, channels: int, rate: float, duration: float, size: int,
                 name: str, concurrency: int, ca_file: str | None) -> None:
        self.url, self.token, self.jwt_secret = url, token, jwt_secret
        self.redis_url, self.redis_prefix, self.redis_cluster = (
            redis_url, redis_prefix, redis_cluster)
        self.api_url, self.api_key = api_url, api_key
        self.subscribers, self.channels = subscribers, channels
        self.rate, self.duration, self.size = rate, duration, size
        self.name, self.concurrency, self.ca_file = name, concurrency, ca_file

    def check(self) -> None:
        if not (self.token or self.jwt_secret):
            raise UsageError("bench: set --token (WSB_TOKEN) or --jwt-secret (WSB_JWT_SECRET)")
        if self.api_url:
            if not self.api_key:
                raise UsageError("bench: --api-url needs --api-key (WSB_API_KEY)")
            if not self.api_url.startswith(("http://", "https://")):
                raise UsageError("bench: --api-url must be an http:// or https:// URL")
        elif not self.redis_url:
            raise UsageError("bench: set --redis-url (WSB_REDIS_URL), or --api-url and "
                             "--api-key: the publisher writes as a backend does")
        if self.subscribers < 1 or self.channels < 1 or self.channels > self.subscribers:
            raise UsageError("bench: need 1 ≤ --channels ≤ --subscribers")
        if self.rate <= 0 or self.duration <= 0 or self.size < 40:
            raise UsageError("bench: --rate and --duration must be positive and "
                             "--message-size at least 40 bytes")
        try:
            self.endpoint()
        except (ValueError, OSError) as exc:
            raise UsageError(f"bench: {exc}") from None

    def endpoint(self) -> Endpoint:
        tls = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else None
        return Endpoint.from_url(self.url, tls)

    def mint(self, sub_id: int) -> str:
        assert self.jwt_secret is not None
        claims = {"sub": f"bench-{sub_id}", "exp": int(time.time() + self.duration) + 3600,
                  "channels": [f"{self.name}.>"]}
        return jwt.encode(claims, self.jwt_secret, algorithm="HS256")

    async def measure(self) -> dict[str, Any]:
        progress = Progress()
        audience = Audience(self.endpoint(), token=self.token,
                            mint=self.mint if self.jwt_secret else None)

        def connecting() -> None:
            progress.status(f"connecting {audience.subscribed:,}/{self.subscribers:,} "
                            f"({sum(audience.failures.values()):,} failed)")

        try:
            connect_s = await connect_all(audience, self.subscribers, self.channels,
                                          self.concurrency, self.name, connecting)
            subscribers_per_channel = audience.per_channel(self.channels)
            progress.done(f"connected {audience.subscribed:,}/{self.subscribers:,} "
                          f"in {connect_s:.2f} s")
            gc.collect()
            gc.freeze()  # the connections are permanent: keep them out of GC passes
            audience.begin(1)
            cpu0, wall0 = _cpu_seconds(), time.perf_counter()
            published = await self._publish(audience, progress, subscribers_per_channel)
            expected = sum(n * s for n, s in zip(published.per_channel,
                                                 subscribers_per_channel, strict=True))
            await self._drain(audience, expected, progress)
            step = step_report(audience.counters, _cpu_seconds() - cpu0,
                               time.perf_counter() - wall0)
        finally:
            audience.close()
        return self._report(audience, connect_s, published, expected, step)

    async def _publish(self, audience: Audience, progress: Progress,
                       per_channel: list[int]) -> Published:
        publisher: Publisher = (
            ApiPublisher(self.api_url, self.api_key or "") if self.api_url
            else RedisPublisher(self.redis_url or "", self.redis_prefix,
                                cluster=self.redis_cluster))
        names = [f"{self.name}.{i}" for i in range(self.channels)]

        def tick(published: Published) -> None:
            progress.status(
                f"publishing {published.seconds:4.1f}/{self.duration:g} s: "
                f"{published.sent:,} sent, {audience.counters.unique:,} delivered, "
                f"{audience.counters.dups:,} duplicated"
            )

        try:
            published = await publish_paced(publisher, names, self.rate, self.duration,
                                            size=self.size, on_tick=tick)
        finally:
            await publisher.close()
        progress.done(f"published {published.sent:,} messages in {published.seconds:.2f} s")
        return published

    @staticmethod
    async def _drain(audience: Audience, expected: int, progress: Progress) -> None:
        deadline = time.monotonic() + DRAIN_SECONDS
        while audience.counters.unique < expected and time.monotonic() < deadline:
            progress.status(f"draining {audience.counters.unique:,}/{expected:,}")
            await asyncio.sleep(0.05)

    def _report(self, audience: Audience, connect_s: float, published: Published,
                expected: int, step: dict[str, Any]) -> dict[str, Any]:
        delivered = step["unique"]
        span = max(step["delivery_span_s"], published.seconds)
        return {
            "url": self.url,
            "subscribers": self.subscribers,
            "channels": self.channels,
            "rate": self.rate,
            "duration_s": self.duration,
            "message_size": self.size,
            "connect": {
                "subscribed": audience.subscribed,
                "failed": sum(audience.failures.values()),
                "failures": dict(audience.failures.most_common(5)),
                "seconds": connect_s,
                "per_s": audience.subscribed / connect_s if connect_s > 0 else 0.0,
            },
            "publish": {"sent": published.sent, "seconds": published.seconds,
                        "achieved_rate": published.achieved_rate},
            "deliveries": {
                "expected": expected,
                "delivered": delivered,
                "per_s": delivered / span if span > 0 else 0.0,
                "lost": max(0, expected - delivered),
                "duplicated": step["dups"],
                "late": step["late"],
                "gaps": step["gaps"],
            },
            "latency_ms": {key: value / 1000 for key, value in step["latency_us"].items()},
            "connections_lost": audience.lost,
            "close_codes": {str(code): n for code, n in audience.close_codes.items()},
            "client_cpu_fraction": step["cpu_fraction"],
        }


def render(report: dict[str, Any]) -> str:
    """The report for a person."""
    c, p, d, lat = (report["connect"], report["publish"], report["deliveries"],
                    report["latency_ms"])
    lines = [
        f"wsbroker bench: {report['subscribers']:,} subscribers on {report['channels']:,} "
        f"channel(s) at {report['url']}",
        f"  connect     {c['subscribed']:,} subscribed, {c['failed']:,} failed, "
        f"{c['per_s']:,.0f} connects/s",
        f"  publish     {p['sent']:,} messages, {p['achieved_rate']:,.1f} msg/s "
        f"(target {report['rate']:g})",
        f"  deliveries  {d['delivered']:,} of {d['expected']:,}, {d['per_s']:,.0f}/s",
        f"  latency ms  p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  p99 {lat['p99']:.2f}  "
        f"max {lat['max']:.2f}",
        f"  lost {d['lost']:,}  duplicated {d['duplicated']:,}  "
        f"connections lost {report['connections_lost']:,}",
    ]
    if c["failures"]:
        lines.append("  connect failures: " + ", ".join(
            f"{reason} ×{count}" for reason, count in c["failures"].items()))
    if report["client_cpu_fraction"] > 0.85:
        lines.append("  note: this process was over 85% busy; the client may be the "
                     "bottleneck (run bench from another machine, or fewer subscribers)")
    return "\n".join(lines)


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _raise_fd_limit(subscribers: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < subscribers + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, subscribers + 1024), hard))
        if hard < subscribers + 64:
            raise UsageError(f"bench: {subscribers:,} subscribers need more open files "
                             f"than this process may have ({hard:,}); raise `ulimit -n`")
