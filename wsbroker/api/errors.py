"""API errors: one exception carrying the HTTP status and the SPEC's error code.

Every refusal, from a missing key to a backplane that is down, leaves the API
as ``{"error": {"code": …, "message": …}}`` with its status (SPEC §12), so a
backend in any language handles errors one way.
"""

from __future__ import annotations

import orjson


class ApiError(Exception):
    """A request we refuse: ``status`` and ``code`` tell the caller what to do."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    @property
    def body(self) -> bytes:
        return error_body(self.code, self.message)


def error_body(code: str, message: str) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message}})


def bad_request(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def invalid_channel(channel: str) -> ApiError:
    return ApiError(400, "invalid_channel", f"{channel[:300]!r} is not a valid channel")


def unavailable() -> ApiError:
    return ApiError(503, "unavailable", "the backplane is unavailable; retry shortly")


UNAUTHORIZED = ApiError(401, "unauthorized", "a valid API key is required")
NOT_FOUND = ApiError(404, "not_found", "no such endpoint")
TOO_LARGE = ApiError(413, "too_large", "the request body is larger than --api-max-body")
NOT_JSON = ApiError(415, "unsupported_media_type",
                    "send the body as JSON (Content-Type: application/json)")
BODY_TIMEOUT = ApiError(408, "timeout", "the request body did not arrive in time")


def method_not_allowed(allowed: str) -> ApiError:
    return ApiError(405, "method_not_allowed", f"use {allowed}")
