"""Logging set-up: readable text or JSON lines on stderr, with secrets redacted.

Redaction runs on the final message of every record, the websockets library's
debug output included (it logs request lines and frames), so a JWT can never
reach a log line whichever logger or format carried it. A request path loses
its whole query string: a token may hide there percent-encoded (``%74oken=``),
where no pattern for its name or shape would find it.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from urllib.parse import urlsplit, urlunsplit

import orjson

_SECRETS = (
    # websockets' debug lines show frame bodies, cut short: a cut token would
    # not match the JWT pattern below, so frame bodies are never logged.
    (re.compile(r"^([<>] (?:TEXT|BINARY|CONT)) .*?(\[\d+ bytes(?:, continued)?\])?$", re.S),
     r"\1 [body redacted] \2"),
    # The query string of any path or URL (`GET /ws?token=… HTTP/1.1`), whole.
    (re.compile(r"(/[^\s?\"'<>]*)\?[^\s\"'<>]+"), r"\1?[redacted]"),
    # A JWT anywhere: three base64url parts, the first one a JSON header ("eyJ").
    (re.compile(r"eyJ[A-Za-z0-9_\-]*\.[A-Za-z0-9_\-]*\.?[A-Za-z0-9_\-]*"), "[redacted-jwt]"),
    # Any token= parameter, whatever its value looks like.
    (re.compile(r"(token=)[^&\s\"']+", re.IGNORECASE), r"\1[redacted]"),
    (re.compile(r"(\"token\"\s*:\s*\")[^\"]*", re.IGNORECASE), r"\1[redacted]"),
    (re.compile(r"(authorization:\s*\w+\s+)\S+", re.IGNORECASE), r"\1[redacted]"),
)


def redact(message: str) -> str:
    for pattern, replacement in _SECRETS:
        message = pattern.sub(replacement, message)
    return message


def safe_url(url: str) -> str:
    """``url`` fit for logs: no user info and no query, either may hold a credential."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "[redacted]@" + netloc.rpartition("@")[2]
    query = "[redacted]" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


class RedactingFilter(logging.Filter):
    """Renders each record's message once, with secrets removed."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_text:
            entry["exc"] = record.exc_text
        return orjson.dumps(entry).decode()


class Throttled:
    """A log line that repeats at most once per ``interval``, counting what it skipped.

    For events a client or a publisher can cause at will (bad payloads, refused
    handshakes): the operator learns they happen and how often, and a flood
    cannot flood the log.
    """

    def __init__(self, logger: logging.Logger, level: int, interval: float = 10.0) -> None:
        self._logger = logger
        self._level = level
        self._interval = interval
        self._count = 0
        self._logged_at = -interval

    def __call__(self, message: str, *args: object) -> None:
        """Log ``message`` % ``args`` with ``{count}`` events since the last line."""
        self._count += 1
        now = time.monotonic()
        if now - self._logged_at >= self._interval:
            self._logger.log(self._level, message.replace("{count}", str(self._count)), *args)
            self._count = 0
            self._logged_at = now


def configure_logging(level: str, fmt: str) -> None:
    """Send every log line to stderr (stdout is for what commands print)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The library's per-connection INFO lines ("connection open") are noise at scale.
    websockets_level = logging.DEBUG if level == "debug" else logging.WARNING
    logging.getLogger("websockets").setLevel(websockets_level)
