"""A page in real headless Chromium running wsbroker.js, for the browser-client tests.

The page lives on its own origin (``http://app.test``, answered by Playwright's
router), so importing ``/wsbroker.js`` from a node also shows the cross-origin
headers work. ``/token`` on that origin is the application's backend endpoint
that mints tokens (what the README tells applications to build): the tests
count its calls, and can slow it down or make it mint what they need.

Everything the client emits is logged in ``window.events`` with a timestamp;
every frame of every WebSocket is recorded on the Python side.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.helpers import make_token

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run",
                 # The page's origin is "public" (app.test); the nodes are on loopback.
                 "--disable-features=LocalNetworkAccessChecks"]
APP = "http://app.test"
WAIT_MS = 10_000

needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                    reason=f"no Chromium at {CHROMIUM} (Debian package chromium)")

SETUP = """
async ([moduleUrl, wsUrl, options, useGetToken]) => {
  const { WsBroker, WsBrokerError } = await import(moduleUrl);
  window.WsBrokerError = WsBrokerError;
  window.events = [];
  const log = (kind, value) => window.events.push({ kind, at: Date.now(), ...value });
  window.log = log;
  if (useGetToken) {
    options.getToken = async () => {
      const response = await fetch("/token");
      if (!response.ok) throw new Error(`token endpoint said ${response.status}`);
      return response.text();
    };
  }
  const client = new WsBroker(wsUrl, options);
  client.on("state", (event) => log("state", event));
  client.on("error", (error) => log("error", { code: error.code, closeCode: error.closeCode,
                                               message: error.message }));
  window.client = client;
  window.track = (channel, subscribeOptions) => {
    const sub = client.subscribe(channel, subscribeOptions);
    sub.on("message", (message) => log("message", message));
    sub.on("subscribed", (event) => log("subscribed", event));
    sub.on("unsubscribed", (event) => log("unsubscribed", event));
    sub.on("error", (error) => log("suberror", { channel, code: error.code }));
    return sub;
  };
  client.connect();
}
"""


@dataclass
class Socket:
    """One WebSocket the page opened, and the frames it sent and received."""

    url: str
    opened: float
    sent: list[dict[str, Any]] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)

    def ops(self, op: str) -> list[dict[str, Any]]:
        return [frame for frame in self.sent if frame.get("op") == op]


class TokenEndpoint:
    """The application's backend endpoint that mints a token per call."""

    def __init__(self) -> None:
        self.mint: Callable[[], str] = lambda: make_token(
            "alice", publish=[">"], jti=str(len(self.issued)))
        self.delay = 0.0
        self.issued: list[str] = []
        self.started = asyncio.Event()
        self.active = 0
        self.most_active = 0

    async def handle(self, route: Any) -> None:
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        self.started.set()
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            token = self.mint()
            self.issued.append(token)
            await route.fulfill(status=200, content_type="text/plain", body=token)
        finally:
            self.active -= 1

    @property
    def calls(self) -> int:
        return len(self.issued)


class Tab:
    """One page with one client; its event log and its sockets."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.sockets: list[Socket] = []
        self.tokens = TokenEndpoint()
        self.errors: list[str] = []
        page.on("websocket", self._on_websocket)
        page.on("pageerror", lambda error: self.errors.append(str(error)))

    def _on_websocket(self, ws: Any) -> None:
        socket = Socket(ws.url, time.time())
        self.sockets.append(socket)
        ws.on("framesent", lambda payload: socket.sent.append(_frame(payload)))
        ws.on("framereceived", lambda payload: socket.received.append(_frame(payload)))

    async def start(self, module_url: str, ws_url: str, *, get_token: bool = False,
                    **options: Any) -> None:
        await self.page.route(f"{APP}/token", self.tokens.handle)
        await self.page.route(f"{APP}/", lambda route: route.fulfill(
            status=200, content_type="text/html", body="<!doctype html><title>app</title>"))
        await self.page.goto(f"{APP}/")
        await self.page.evaluate(SETUP, [module_url, ws_url, options, get_token])

    async def js(self, expression: str, arg: Any = None) -> Any:
        return await self.page.evaluate(expression, arg)

    async def until(self, predicate: str, timeout_ms: int = WAIT_MS) -> None:
        """Wait until the JS ``predicate`` (over ``events``, ``client``) holds."""
        from playwright.async_api import TimeoutError as PlaywrightTimeout

        try:
            await self.page.wait_for_function(
                f"() => {{ const events = window.events, client = window.client; "
                f"return Boolean({predicate}); }}", timeout=timeout_ms, polling=20)
        except PlaywrightTimeout:
            events = await self.page.evaluate("window.events")
            frames = [(s.url, s.sent[:20], s.received[:20]) for s in self.sockets]
            raise AssertionError(f"timed out waiting for {predicate}\nevents: {events}\n"
                                 f"sockets: {frames}\npage errors: {self.errors}") from None

    async def events(self, kind: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.page.evaluate(
            "kind => window.events.filter(e => e.kind === kind)", kind)
        return result

    async def states(self) -> list[str]:
        return [event["state"] for event in await self.events("state")]

    async def count(self, kind: str, where: str = "true") -> int:
        result: int = await self.page.evaluate(
            f"() => window.events.filter(e => e.kind === {orjson.dumps(kind).decode()} "
            f"&& ({where})).length")
        return result

    async def until_state(self, state: str, nth: int = 1, timeout_ms: int = WAIT_MS) -> None:
        await self.until(f"events.filter(e => e.kind === 'state' && e.state === '{state}')"
                         f".length >= {nth}", timeout_ms)


def _frame(payload: Any) -> dict[str, Any]:
    try:
        frame = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return {"raw": payload}
    return frame if isinstance(frame, dict) else {"raw": frame}


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        instance = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            await instance.close()


@pytest.fixture
async def open_tab(browser: Any) -> AsyncIterator[Callable[..., Any]]:
    """Open pages (``await open_tab()``); ``init_script`` runs before the page's own."""
    contexts: list[Any] = []

    async def open_(init_script: str | None = None, **context_options: Any) -> Tab:
        context = await browser.new_context(**context_options)
        contexts.append(context)
        if init_script:
            await context.add_init_script(init_script)
        return Tab(await context.new_page())

    yield open_
    for context in contexts:
        await context.close()
