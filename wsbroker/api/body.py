"""Reading a request body as JSON without letting the client decide what it costs.

A body over ``--api-max-body`` is refused with 413 from its ``Content-Length``
before a byte of it is read, or (chunked) as soon as the bytes read pass the
limit; a body that has not arrived in full within the server's body timeout
(a client sending a byte a second) is cut with 408. Compressed bodies are
refused (415): their decompressed size is not known up front, and a backend
gains nothing from compressing a publish.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp.web_request import BaseRequest

from wsbroker.api.errors import BODY_TIMEOUT, NOT_JSON, TOO_LARGE, ApiError, bad_request

JSON = "application/json"


async def read_json(request: BaseRequest, max_body: int, time_limit: float) -> Any:
    """The body's JSON value; raises :class:`ApiError` (400, 408, 413, 415)."""
    if request.content_type != JSON:
        raise NOT_JSON
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding != "identity":
        raise ApiError(415, "unsupported_media_type", "compressed bodies are not accepted")
    length = request.content_length
    if length is not None and length > max_body:
        raise TOO_LARGE
    if request.headers.get("Expect", "").lower() == "100-continue":
        # curl asks before sending a larger body; say yes now that its size is known to fit.
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    content = request.content
    if content.is_eof():  # all of it arrived with the head (the usual case): no wait, no timer
        body = content.read_nowait()
        if len(body) > max_body:
            raise TOO_LARGE
    else:
        body = await _read_bounded(request, max_body, time_limit)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise bad_request("the body is not valid JSON") from None


async def _read_bounded(request: BaseRequest, max_body: int, time_limit: float) -> bytes:
    content = request.content
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(time_limit):
            while chunk := await content.readany():
                size += len(chunk)
                if size > max_body:
                    raise TOO_LARGE
                chunks.append(chunk)
    except TimeoutError:
        raise BODY_TIMEOUT from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
