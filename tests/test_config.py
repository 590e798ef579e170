"""Settings: flags, WSB_* variables, defaults, and refusals (SPEC §8, §10)."""

from __future__ import annotations

import pytest

from wsbroker.config import (
    ConfigError,
    RateLimit,
    load_settings,
    parse_duration,
    parse_rate_limit,
    parse_size,
)
from wsbroker.ratelimit import OpLimiter


def test_defaults_match_the_spec() -> None:
    settings = load_settings({}, {})
    assert (settings.host, settings.port, settings.redis_prefix) == ("127.0.0.1", 8765, "ws:")
    assert settings.max_message_size == 64 * 1024
    assert settings.max_subscriptions == 128
    assert settings.rate_limit == RateLimit(50, 100)
    assert settings.max_send_buffer == 1024 * 1024
    assert settings.max_connections == 0
    assert settings.auth_timeout == 10 and settings.drain_seconds == 10
    assert settings.jwt_algorithms == ("HS256",) and settings.jwt_leeway == 10
    assert not settings.compression and not settings.dev and not settings.has_key


def test_flags_win_over_environment_and_environment_over_defaults() -> None:
    env = {"WSB_PORT": "9000", "WSB_REDIS_PREFIX": "x:", "WSB_PUBLIC_CHANNELS": "a.>,b"}
    settings = load_settings({"port": "9001"}, env)
    assert settings.port == 9001
    assert settings.redis_prefix == "x:"
    assert settings.public_channels.matches("a.b") and settings.public_channels.matches("b")


def test_list_flags_repeat_and_split_on_commas() -> None:
    settings = load_settings({"jwt_algorithms": ["RS256,ES256", "EdDSA"]}, {})
    assert settings.jwt_algorithms == ("RS256", "ES256", "EdDSA")


def test_dev_mode_makes_demo_channels_public() -> None:
    assert load_settings({"dev": "true"}, {}).public_channels.matches("demo.chat")
    assert not load_settings({}, {}).public_channels.matches("demo.chat")


@pytest.mark.parametrize(("text", "size"), [("64KiB", 65536), ("1MiB", 1048576), ("100", 100),
                                            ("2 kib", 2048)])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(("text", "seconds"), [("10", 10), ("10s", 10), ("5m", 300),
                                               ("24h", 86400), ("1d", 86400), ("0.5", 0.5)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_rate_limits() -> None:
    assert parse_rate_limit("50:100") == RateLimit(50, 100)
    assert parse_rate_limit("20") == RateLimit(20, 40)
    assert not parse_rate_limit("0").enabled


@pytest.mark.parametrize(
    "flags",
    [{"max_message_size": "lots"}, {"drain_seconds": "soon"}, {"rate_limit": "fast"},
     {"jwt_algorithms": ["none"]}, {"log_level": "loud"}, {"port": "70000"},
     {"public_channels": ["a..b"]}, {"tls_cert": "c.pem"}, {"dev": "maybe"},
     {"history": ["chat.>=0"]}, {"history": ["a..b=5"]}, {"redis_cluster": "true"}],
)
def test_bad_values_are_refused_with_the_flag_named(flags: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="--"):
        load_settings(flags, {})


def test_token_bucket_allows_bursts_then_refills() -> None:
    limiter = OpLimiter(RateLimit(10, 20), clock=0.0)
    assert all(limiter.allow(0.0) for _ in range(20))
    assert not limiter.allow(0.0)
    assert limiter.allow(0.1)  # one token back after 1/rate seconds
    assert not limiter.allow(0.1)


def test_abuse_needs_rejections_in_five_consecutive_seconds() -> None:
    limiter = OpLimiter(RateLimit(0.1, 1), clock=0.0)  # one op, then nothing for 10 s
    assert limiter.allow(0.0)
    for second in range(5):
        assert not limiter.allow(second + 0.5)
        assert limiter.abusive is (second == 4)


def test_a_quiet_second_resets_the_abuse_streak() -> None:
    limiter = OpLimiter(RateLimit(0.1, 1), clock=0.0)
    assert limiter.allow(0.0)
    for second in (0, 1, 2, 3, 5, 6, 7):  # second 4 had no rejection
        assert not limiter.allow(second + 0.5)
    assert not limiter.abusive
