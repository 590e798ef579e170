"""One frozen Settings object, built once from flags and ``WSB_*`` variables.

Every option is declared once in :data:`OPTIONS`; the command line, the
environment and the defaults are merged here (flags win over the environment,
the environment over defaults) and validated before anything starts, so no
other module ever reads ``os.environ`` or re-parses a string.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from wsbroker.channels import PatternSet
from wsbroker.history import HistoryRules


class ConfigError(ValueError):
    """A setting has a value we cannot use; the message says which and why."""


_SIZE_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_size(text: str) -> int:
    """``64KiB`` → 65536. Plain numbers are bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ConfigError(f"{text!r} is not a size (use bytes, or a KiB/MiB suffix)")
    return int(match.group(1)) * _SIZE_UNITS[unit]


def parse_duration(text: str) -> float:
    """``10s``, ``5m``, ``24h``, ``7d`` or plain seconds → seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if match is None:
        raise ConfigError(f"{text!r} is not a duration (use seconds, or an s/m/h/d suffix)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Token bucket for client ops: ``rate`` per second, bursts up to ``burst``."""

    rate: float
    burst: float

    @property
    def enabled(self) -> bool:
        return self.rate > 0


def parse_rate_limit(text: str) -> RateLimit:
    """``50:100`` → 50/s with a burst of 100; ``50`` → burst 2×rate; ``0`` → off."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?::\s*(\d+(?:\.\d+)?)\s*)?", text)
    if match is None:
        raise ConfigError(f"{text!r} is not a rate limit (use RATE or RATE:BURST)")
    rate = float(match.group(1))
    burst = float(match.group(2)) if match.group(2) else 2 * rate
    if rate > 0 and burst < 1:
        raise ConfigError(f"rate limit {text!r}: the burst must be at least 1")
    return RateLimit(rate, burst)


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"{text!r} is not a boolean (use true or false)")


def parse_list(values: Iterable[str]) -> tuple[str, ...]:
    """Comma-separated values, possibly repeated: ``a,b`` ``c`` → (a, b, c)."""
    return tuple(item.strip() for value in values for item in value.split(",") if item.strip())


@dataclass(frozen=True, slots=True)
class Option:
    """One ``serve`` flag: its name, how to read it, its default and its help."""

    name: str
    parse: Callable[[str], Any]
    default: str | None
    help: str
    is_flag: bool = False
    is_list: bool = False

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return "WSB_" + self.dest.upper()


def _text(value: str) -> str:
    return value


OPTIONS: tuple[Option, ...] = (
    Option("host", _text, "127.0.0.1", "address to listen on"),
    Option("port", int, "8765", "port to listen on (0 picks a free one)"),
    Option("redis-url", _text, None, "Redis URL; unset runs the in-process backplane"),
    Option("redis-cluster", parse_bool, "false", "REDIS_URL names a Redis Cluster node",
           is_flag=True),
    Option("redis-prefix", _text, "ws:", "prefix of Redis channel names"),
    Option("node-id", _text, None, "this node's id (default: hostname-pid)"),
    Option("jwt-secret", _text, None, "shared secret for HS* tokens"),
    Option("jwt-public-key", _text, None, "PEM public key file for RS/ES/PS/EdDSA tokens"),
    Option("jwks-url", _text, None, "JWKS URL to fetch verification keys from"),
    Option("jwt-algorithms", _text, "HS256", "allowed JWT algorithms", is_list=True),
    Option("jwt-audience", _text, None, "required `aud` claim"),
    Option("jwt-issuer", _text, None, "required `iss` claim"),
    Option("jwt-leeway", parse_duration, "10s", "clock skew allowed on exp/nbf"),
    Option("max-message-size", parse_size, "64KiB", "largest client frame"),
    Option("max-subscriptions", int, "128", "subscriptions per connection"),
    Option("rate-limit", parse_rate_limit, "50:100", "ops per connection, RATE[:BURST]; 0 = off"),
    Option("max-send-buffer", parse_size, "1MiB", "bytes queued per client before it is cut"),
    Option("max-connections", int, "0", "WebSocket connections per node; 0 = no limit"),
    Option("auth-timeout", parse_duration, "10s", "time allowed for first-message auth"),
    Option("drain-seconds", parse_duration, "10", "spread of the 1012 closes on shutdown"),
    Option("public-channels", _text, None, "patterns any authenticated client may subscribe to",
           is_list=True),
    Option("history", _text, None, "PATTERN=SIZE[:TTL] channels that keep history",
           is_list=True),
    Option("allowed-origins", _text, None, "exact Origin values allowed to upgrade",
           is_list=True),
    Option("trusted-proxies", _text, None, "addresses/CIDRs whose X-Forwarded-For is believed",
           is_list=True),
    Option("tls-cert", _text, None, "PEM certificate chain for native wss"),
    Option("tls-key", _text, None, "PEM private key for native wss"),
    Option("compression", parse_bool, "false", "offer permessage-deflate", is_flag=True),
    Option("workers", int, "1", "SO_REUSEPORT worker processes (needs --redis-url)"),
    Option("log-level", _text, "info", "debug, info, warning or error"),
    Option("log-format", _text, "text", "text or json"),
    Option("dev", parse_bool, "false", "development mode: generated key, demo page",
           is_flag=True),
)

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a node needs to run, validated; build it with :func:`load_settings`."""

    host: str = "127.0.0.1"
    port: int = 8765
    redis_url: str | None = None
    redis_cluster: bool = False
    redis_prefix: str = "ws:"
    node_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    jwks_url: str | None = None
    jwt_algorithms: tuple[str, ...] = ("HS256",)
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway: float = 10.0
    max_message_size: int = 64 * 1024
    max_subscriptions: int = 128
    rate_limit: RateLimit = RateLimit(50, 100)
    max_send_buffer: int = 1024 * 1024
    max_connections: int = 0
    auth_timeout: float = 10.0
    drain_seconds: float = 10.0
    public_channels: PatternSet = PatternSet(())
    history: HistoryRules = HistoryRules()
    allowed_origins: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    tls_cert: str | None = None
    tls_key: str | None = None
    compression: bool = False
    workers: int = 1
    log_level: str = "info"
    log_format: str = "text"
    dev: bool = False

    @property
    def has_key(self) -> bool:
        return bool(self.jwt_secret or self.jwt_public_key or self.jwks_url)


def load_settings(
    flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Merge flags (already typed or raw strings), ``WSB_*`` variables and defaults.

    ``flags`` maps option dests to values; ``None`` means "not given". List
    options take a list of raw strings (the flag may repeat).
    """
    flags = flags or {}
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for option in OPTIONS:
        raw = flags.get(option.dest)
        if raw is None and option.env in environ:
            raw = [environ[option.env]] if option.is_list else environ[option.env]
        try:
            values[option.dest] = _convert(option, raw)
        except (ConfigError, ValueError) as exc:
            raise ConfigError(f"--{option.name}: {exc}") from None
    known = {f.name for f in fields(Settings)}
    values = {key: value for key, value in values.items() if key in known and value is not None}
    if values.get("dev") and "public_channels" not in values:
        values["public_channels"] = PatternSet.parse(["demo.>"])
    settings = Settings(**values)
    _validate(settings)
    return settings


def _convert(option: Option, raw: Any) -> Any:
    if raw is None:
        if option.default is None:
            return None
        raw = [option.default] if option.is_list else option.default
    if option.is_list:
        items = parse_list([raw] if isinstance(raw, str) else raw)
        if option.dest == "public_channels":
            return PatternSet.parse(items)
        if option.dest == "history":
            return HistoryRules.parse(items)
        return items
    if not isinstance(raw, str):
        return raw
    return option.parse(raw)


def _validate(settings: Settings) -> None:
    if not 0 <= settings.port <= 65535:
        raise ConfigError(f"--port: {settings.port} is not a TCP port")
    if settings.log_level not in LOG_LEVELS:
        raise ConfigError(f"--log-level: use one of {', '.join(LOG_LEVELS)}")
    if settings.log_format not in LOG_FORMATS:
        raise ConfigError(f"--log-format: use one of {', '.join(LOG_FORMATS)}")
    if "none" in (alg.lower() for alg in settings.jwt_algorithms):
        raise ConfigError("--jwt-algorithms: 'none' is never accepted")
    if settings.max_subscriptions < 1:
        raise ConfigError("--max-subscriptions must be at least 1")
    if settings.max_message_size < 64:
        raise ConfigError("--max-message-size must be at least 64 bytes")
    if settings.max_connections < 0 or settings.workers < 1:
        raise ConfigError("--max-connections must be ≥ 0 and --workers ≥ 1")
    if settings.history and ("{" in settings.redis_prefix or "}" in settings.redis_prefix):
        raise ConfigError("--redis-prefix: no braces with --history (history keys use "
                          "{<prefix><channel>} as their Redis Cluster hash tag)")
    if settings.redis_cluster and not settings.redis_url:
        raise ConfigError("--redis-cluster needs --redis-url (any node of the cluster)")
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
