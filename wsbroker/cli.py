"""The ``wsbroker`` command: serve, token, publish, listen, bench.

Exit codes: 0 done, 1 failed at run time (refused, unreachable), 2 bad usage
or configuration (the message says what to change).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Coroutine, Sequence
from typing import Any

import jwt
import orjson

from wsbroker.channels import InvalidPattern, PatternSet, is_valid_channel
from wsbroker.config import (
    OPTIONS,
    ConfigError,
    Settings,
    load_settings,
    parse_bool,
    parse_duration,
    parse_list,
)
from wsbroker.history import HistoryRules, Published

EXIT_FAILED = 1
EXIT_USAGE = 2

GC_YOUNG_THRESHOLD = 50_000
"""Allocations between two young-generation collections (CPython's default: 700).

With thousands of connections, the default collects so often that short-lived
objects (frames in flight, keepalive pings' futures) are caught alive, age into
the old generation, and trigger full collections of every connection's
objects: 80–270 ms pauses, measured with 5,000 connections at 20k deliveries/s
(p99 69 ms, max 308 ms). At 50,000 they die young: p99 2.7 ms, max 11 ms, and
connects/s up 28% (``wsbroker bench``, docs/bench.md). The young generation then
holds a few MB at most before it is collected."""

NO_KEY_MESSAGE = (
    "wsbroker: no JWT verification key is configured, so no client could ever connect.\n"
    "  Set one of --jwt-secret (or WSB_JWT_SECRET), --jwt-public-key FILE, or --jwks-url URL,\n"
    "  or run `wsbroker serve --dev` to try it out with a generated key."
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw_argv)
    args.raw_argv = raw_argv
    try:
        result: int = args.run(args)
    except ConfigError as exc:
        print(f"wsbroker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return result


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsbroker", description="Real-time WebSocket pub/sub server."
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run a node", description=(
        "Run a node. Every flag can also be set as WSB_<FLAG> (e.g. WSB_REDIS_URL); "
        "flags win over the environment."))
    for option in OPTIONS:
        help_text = f"{option.help} [{option.env}" + (
            f", default {option.default}]" if option.default else "]")
        if option.is_flag:
            serve.add_argument(f"--{option.name}", dest=option.dest, action="store_const",
                               const="true", default=None, help=help_text)
        elif option.is_list:
            serve.add_argument(f"--{option.name}", dest=option.dest, action="append",
                               default=None, metavar="LIST", help=help_text)
        else:
            serve.add_argument(f"--{option.name}", dest=option.dest, default=None,
                               metavar=option.dest.split("_")[-1].upper(), help=help_text)
    serve.add_argument("--worker-of", dest="worker_of", default=None, help=argparse.SUPPRESS)
    serve.add_argument("--metrics-dir", dest="metrics_dir", default=None, help=argparse.SUPPRESS)
    serve.set_defaults(run=_run_serve)

    token = commands.add_parser("token", help="mint a token for testing or for a backend",
                                description="Sign a JWT and print only it on stdout.")
    token.add_argument("--sub", required=True, help="user id (the `sub` claim)")
    token.add_argument("--channels", action="append", default=[], metavar="PATTERNS",
                       help="patterns the client may subscribe to (comma-separated)")
    token.add_argument("--publish", action="append", default=[], metavar="PATTERNS",
                       help="patterns the client may publish to (comma-separated)")
    token.add_argument("--ttl", default="1h", help="lifetime (default 1h)")
    token.add_argument("--jwt-secret", default=None, help="HS256 secret [WSB_JWT_SECRET]")
    token.add_argument("--jwt-private-key", default=None, metavar="FILE",
                       help="PEM private key for RS256/ES256/EdDSA [WSB_JWT_PRIVATE_KEY]")
    token.add_argument("--algorithm", default=None,
                       help="signing algorithm (default: HS256, or from the private key)")
    token.add_argument("--kid", default=None, help="key id to put in the header")
    token.add_argument("--jwt-audience", default=None, help="`aud` claim [WSB_JWT_AUDIENCE]")
    token.add_argument("--jwt-issuer", default=None, help="`iss` claim [WSB_JWT_ISSUER]")
    token.set_defaults(run=_run_token)

    publish = commands.add_parser("publish", help="publish one message", description=(
        "Publish JSON to a channel: through Redis when --redis-url is set (what backends "
        "do), else through a node's WebSocket with a token that may publish."))
    publish.add_argument("channel")
    publish.add_argument("json", help="the message: any JSON document")
    publish.add_argument("--redis-url", default=None, help="[WSB_REDIS_URL]")
    publish.add_argument("--redis-prefix", default=None, help="[WSB_REDIS_PREFIX, default ws:]")
    publish.add_argument("--redis-cluster", action="store_true", default=None,
                         help="the URL names a Redis Cluster node: SPUBLISH [WSB_REDIS_CLUSTER]")
    publish.add_argument("--history", action="append", default=None, metavar="PATTERN=SIZE[:TTL]",
                         help="the nodes' history rules: a matching channel records the "
                              "message and its offset is printed [WSB_HISTORY]")
    publish.add_argument("--url", default=None,
                         help="node WebSocket URL when there is no Redis "
                              "[WSB_URL, default ws://127.0.0.1:8765/ws]")
    publish.add_argument("--token", default=None, help="token for --url [WSB_TOKEN]")
    publish.add_argument("--timeout", default="10s",
                         help="give up when Redis or the node has not answered by then "
                              "(default 10s)")
    publish.set_defaults(run=_run_publish)

    listen = commands.add_parser("listen", help="print a channel's messages", description=(
        "Subscribe to channels and print one JSON line per message."))
    listen.add_argument("url", help="node URL, e.g. ws://127.0.0.1:8765/ws")
    listen.add_argument("channels", nargs="+", metavar="CHANNEL")
    listen.add_argument("--token", default=None, help="[WSB_TOKEN]")
    listen.add_argument("--count", type=int, default=None,
                        help="exit 0 after this many messages")
    listen.add_argument("--timeout", default="10s",
                        help="give up when the node has not welcomed us or confirmed a "
                             "subscription by then (default 10s)")
    listen.set_defaults(run=_run_listen)

    bench = commands.add_parser("bench", help="load-test a deployment and report", description=(
        "Connect N subscribers to URL over K channels, publish through Redis at a steady "
        "rate, and report connects/s, deliveries/s, latency, loss and duplicates."))
    from wsbroker.bench.command import configure

    configure(bench)
    bench.set_defaults(run=_run_bench)
    return parser


def _env(name: str) -> str | None:
    """The ``WSB_*`` value for a flag of the non-serve commands."""
    return os.environ.get("WSB_" + name.upper().replace("-", "_")) or None


# -- serve -------------------------------------------------------------------------


def _run_serve(args: argparse.Namespace) -> int:
    flags = {option.dest: getattr(args, option.dest) for option in OPTIONS}
    settings = load_settings(flags)
    is_worker = args.worker_of is not None
    if is_worker:
        settings = dataclasses.replace(settings, node_id=args.worker_of)
    if not settings.has_key:
        if not settings.dev:
            print(NO_KEY_MESSAGE, file=sys.stderr)
            return EXIT_USAGE
        settings = dataclasses.replace(settings, jwt_secret=secrets.token_urlsafe(32))
    if settings.workers > 1 and not is_worker:
        if not settings.redis_url:
            raise ConfigError(
                "--workers needs --redis-url: workers are separate processes and only "
                "a Redis backplane connects them"
            )
        return _run_workers(settings, args.raw_argv[1:])
    from wsbroker.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    _raise_open_file_limit(settings.max_connections)
    return _run_loop(_serve(settings, args.metrics_dir, banner=settings.dev and not is_worker))


def _raise_open_file_limit(max_connections: int) -> None:
    """Each client is a file descriptor: take the hard limit, and say if it is low.

    Container runtimes often start processes with a soft limit of 1,024, which
    would cap a node near a thousand clients whatever its hardware.
    """
    import logging
    import resource

    log = logging.getLogger("wsbroker.cli")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d: %s", soft, exc)
    needed = max(max_connections, 4096) + 64
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("open-file limit is %d: each client needs one, so this node cannot hold "
                    "more than about %d clients; raise it (ulimit -n, LimitNOFILE, "
                    "--ulimit nofile)", soft, soft - 64)
    else:
        log.debug("open-file limit: %s", soft)


def _run_loop(coroutine: Any) -> int:
    """Run on uvloop when it is installed (the ``speed`` extra), else on asyncio."""
    try:
        import uvloop
    except ImportError:
        return int(asyncio.run(coroutine))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return int(runner.run(coroutine))


async def _serve(settings: Settings, metrics_dir: str | None = None, *,
                 banner: bool = False) -> int:
    from wsbroker.server import Node

    try:
        node = Node(settings, metrics_dir=metrics_dir)
    except (OSError, ValueError) as exc:  # the key file or the key settings
        print(f"wsbroker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # Signals count from here: one that arrives while the node starts (Redis
    # may take seconds to answer) stops it cleanly rather than killing it.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    starting = asyncio.ensure_future(node.start())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # a signal during start-up
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await node.stop()
        return 0
    stopping.cancel()
    try:
        starting.result()
    except OSError as exc:  # e.g. the port is taken
        print(f"wsbroker: cannot start: {exc}", file=sys.stderr)
        await node.stop()
        return EXIT_FAILED
    # Everything alive now (modules, settings, the server) lives as long as the
    # process: move it out of the collector's sight, so full collections, which
    # pause every fan-out, scan only what connections create.
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    if banner:
        _print_dev_banner(settings, node.port)
    await stop.wait()
    await node.drain()
    return 0


def _print_dev_banner(settings: Settings, port: int) -> None:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    demo = f"{'https' if settings.tls_cert else 'http'}://{host}:{port}/"
    print("wsbroker dev mode: demo page on, not for production", flush=True)
    if settings.jwt_secret is None:  # a public key or JWKS: we cannot sign for it
        print("token: none (sign one with your identity provider or "
              "`wsbroker token --jwt-private-key FILE`)")
        print(f"demo: {demo}#token=<token>", flush=True)
        return
    token = _sign({"sub": "dev", "channels": [">"], "publish": [">"]}, settings.jwt_secret,
                  "HS256", ttl=24 * 3600)
    print(f"token: {token}")
    print(f"demo: {demo}#token={token}", flush=True)


def _run_workers(settings: Settings, serve_argv: list[str]) -> int:
    """Run ``settings.workers`` worker nodes on one port under a supervisor (workers.py).

    Workers share one metrics directory (prometheus-client multiprocess mode), so
    whichever worker answers a scrape reports the whole node.
    """
    try:  # check the key settings once, here, rather than N times in the workers
        from wsbroker.auth import Verifier

        Verifier(settings)
    except (OSError, ValueError) as exc:
        print(f"wsbroker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from wsbroker.logs import configure_logging
    from wsbroker.workers import Supervisor, worker_command, worker_env

    configure_logging(settings.log_level, settings.log_format)
    argv = _without_flag(serve_argv, "--node-id")
    with tempfile.TemporaryDirectory(prefix="wsbroker-metrics-") as metrics_dir:
        supervisor = Supervisor(
            worker_command(argv, metrics_dir),
            [f"{settings.node_id}-{index}" for index in range(1, settings.workers + 1)],
            env=worker_env(metrics_dir, settings.jwt_secret, argv),
            metrics_dir=metrics_dir,
        )

        def started() -> None:
            if settings.dev:
                _print_dev_banner(settings, settings.port)

        return supervisor.run(started)


def _without_flag(argv: list[str], flag: str) -> list[str]:
    result, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == flag:
            skip = True
        elif not item.startswith(flag + "="):
            result.append(item)
    return result


# -- token -------------------------------------------------------------------------


def _run_token(args: argparse.Namespace) -> int:
    secret = args.jwt_secret or _env("jwt-secret")
    private_key_file = args.jwt_private_key or _env("jwt-private-key")
    claims: dict[str, Any] = {"sub": args.sub}
    try:
        for name, values in (("channels", args.channels), ("publish", args.publish)):
            patterns = [p.strip() for value in values for p in value.split(",") if p.strip()]
            PatternSet.parse(patterns)
            if patterns:
                claims[name] = patterns
    except InvalidPattern as exc:
        raise ConfigError(str(exc)) from None
    for claim, value in (("aud", args.jwt_audience or _env("jwt-audience")),
                         ("iss", args.jwt_issuer or _env("jwt-issuer"))):
        if value:
            claims[claim] = value
    ttl = parse_duration(args.ttl)
    if private_key_file:
        try:
            with open(private_key_file, "rb") as pem:
                key: Any = pem.read()
            algorithm = args.algorithm or _algorithm_for_private_key(key)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"token: cannot use {private_key_file}: {exc}") from None
    elif secret:
        key, algorithm = secret, args.algorithm or "HS256"
    else:
        raise ConfigError("token: set --jwt-secret (WSB_JWT_SECRET) or --jwt-private-key FILE")
    print(_sign(claims, key, algorithm, ttl=ttl, kid=args.kid))
    return 0


def _sign(claims: dict[str, Any], key: Any, algorithm: str, *, ttl: float,
          kid: str | None = None) -> str:
    now = int(time.time())
    payload = {**claims, "iat": now, "exp": now + int(ttl)}
    headers = {"kid": kid} if kid else None
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


def _algorithm_for_private_key(pem: bytes) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(pem, password=None)
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {256: "ES256", 384: "ES384", 521: "ES512"}[key.curve.key_size]
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    raise ConfigError("token: unsupported private key type")


# -- publish / listen --------------------------------------------------------------


def _run_publish(args: argparse.Namespace) -> int:
    if not is_valid_channel(args.channel):
        raise ConfigError(f"{args.channel!r} is not a valid channel name")
    from wsbroker.protocol import reencode

    try:
        data = reencode(orjson.loads(args.json))
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"the message is not valid JSON: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"the message {exc}") from None
    redis_url = args.redis_url or _env("redis-url")
    timeout = _timeout(args.timeout)
    from wsbroker import client

    coroutine: Coroutine[Any, Any, object]
    if redis_url:
        if not redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"--redis-url {redis_url!r} is not a redis://, rediss:// "
                              "or unix:// URL")
        prefix = args.redis_prefix or _env("redis-prefix") or "ws:"
        cluster = args.redis_cluster or parse_bool(_env("redis-cluster") or "false")
        try:
            rules = HistoryRules.parse(parse_list(args.history or [_env("history") or ""]))
        except ValueError as exc:
            raise ConfigError(f"--history: {exc}") from None
        coroutine = _print_offset(client.publish_redis(
            redis_url, prefix, args.channel, data, cluster=cluster,
            rule=rules.rule_for(args.channel), step_timeout=timeout))
    else:
        url = args.url or _env("url") or "ws://127.0.0.1:8765/ws"
        token = args.token or _env("token")
        if not token:
            raise ConfigError("publish: set --redis-url, or --token (WSB_TOKEN) for --url")
        coroutine = _print_offset(client.publish_websocket(url, token, args.channel, data,
                                                           step_timeout=timeout))
    return _run_client(coroutine)


async def _print_offset(publishing: Awaitable[Published]) -> None:
    """Print the offset a history channel gave the message (nothing for other channels)."""
    published = await publishing
    if published.offset is not None:
        print(published.offset)


def _run_listen(args: argparse.Namespace) -> int:
    token = args.token or _env("token")
    if not token:
        raise ConfigError("listen: set --token or WSB_TOKEN")
    bad = [channel for channel in args.channels if not is_valid_channel(channel)]
    if bad:
        raise ConfigError(f"{bad[0]!r} is not a valid channel name")
    from wsbroker import client

    timeout = _timeout(args.timeout)
    return _run_client(client.listen(args.url, token, args.channels, args.count,
                                     step_timeout=timeout))


def _timeout(text: str) -> float:
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ConfigError(f"--timeout must be more than zero, not {text!r}")
    return seconds


def _run_bench(args: argparse.Namespace) -> int:
    from wsbroker.bench.command import UsageError, run

    try:
        return run(args)
    except UsageError as exc:
        raise ConfigError(str(exc).removeprefix("bench: ")) from None


def _run_client(coroutine: Any) -> int:
    from wsbroker.client import ClientError

    try:
        asyncio.run(coroutine)
    except ClientError as exc:
        print(f"wsbroker: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0
