"""Webhook settings (SPEC §13): defaults, and `serve` refusing what cannot work (exit 2)."""

from __future__ import annotations

import base64

import pytest

from wsbroker.cli import main
from wsbroker.config import load_settings

SECRET = "whsec_" + base64.b64encode(b"c" * 32).decode()


def test_serve_refuses_a_webhook_url_without_a_secret(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["serve", "--jwt-secret", "s" * 32, "--webhook-url", "http://127.0.0.1:9/h"])
    assert code == 2
    assert "--webhook-secret" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "named"), [
    (["--webhook-secret", "plain-text"], "--webhook-secret"),
    (["--webhook-secret", SECRET, "--webhook-events", "channel_occupied,typo"],
     "--webhook-events"),
    (["--webhook-secret", SECRET, "--webhook-url", "ftp://example.invalid/"], "--webhook-url"),
])
def test_serve_refuses_bad_webhook_settings(
    capsys: pytest.CaptureFixture[str], flags: list[str], named: str
) -> None:
    argv = ["serve", "--jwt-secret", "s" * 32, "--webhook-url", "http://127.0.0.1:9/h", *flags]
    assert main(argv) == 2
    assert named in capsys.readouterr().err


def test_webhook_defaults_match_the_spec() -> None:
    settings = load_settings({}, environ={})
    assert settings.webhook_url is None
    assert settings.webhook_events == (
        "channel_occupied", "channel_vacated", "member_added", "member_removed")
    assert settings.webhook_vacate_delay == 5.0
    assert settings.webhook_queue == 10_000
    assert settings.presence_ttl == 60.0
    assert settings.webhook_retry_delays == (1.0, 5.0, 30.0, 120.0, 600.0)
    assert settings.webhook_timeout == 10.0
