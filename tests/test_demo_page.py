"""The dev-mode demo page in a real headless Chromium (SPEC §9 `GET /`, §10 `--dev`).

A real ``wsbroker serve --dev`` process serves the page; the page talks to it
over a real WebSocket; messages come from the ``wsbroker publish`` command and
go out to a ``wsbroker listen`` process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from tests.helpers import ServerProcess, http_get

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SCREENSHOT = Path("/tmp/demo.png")
UI_WAIT_MS = 10_000

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"no Chromium at {CHROMIUM} (Debian package chromium)")

StartServer = Callable[..., ServerProcess]


def clean_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("WSB_")}


def wait_for(check: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    """Poll a cheap local ``check`` every 50 ms, at most ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def subscriptions(server: ServerProcess) -> float:
    _, _, body = http_get(server.http + "/metrics")
    match = re.search(r"^wsbroker_subscriptions (\S+)$", body, re.MULTILINE)
    return float(match.group(1)) if match else -1.0


@pytest.fixture
def dev_server(server_process: StartServer) -> Iterator[tuple[ServerProcess, str, str]]:
    """A `serve --dev` process and the token and demo URL it printed."""
    server = server_process("--dev", "--drain-seconds", "0.2", env=clean_env())
    wait_for(lambda: "demo: " in server.stdout, "the dev banner")
    token = re.search(r"^token: (\S+)$", server.stdout, re.MULTILINE)
    demo = re.search(r"^demo: (\S+)$", server.stdout, re.MULTILINE)
    assert token and demo, server.stdout
    yield server, token.group(1), demo.group(1)


def test_demo_page_receives_and_publishes(dev_server: tuple[ServerProcess, str, str]) -> None:
    """Opening the printed demo URL: the page goes online as the dev user, subscribes to
    demo.chat, shows a message published with `wsbroker publish`, and a message typed
    into its form reaches another subscriber with `from`."""
    from playwright.sync_api import expect, sync_playwright

    server, token, demo_url = dev_server
    socket_urls: list[str] = []
    page_errors: list[str] = []
    requests: list[str] = []
    listener: subprocess.Popen[bytes] | None = None
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 700})
            page.on("websocket", lambda ws: socket_urls.append(ws.url))
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            page.on("request", lambda request: requests.append(request.url))
            page.goto(demo_url)

            expect(page.locator("#status")).to_have_text("online", timeout=UI_WAIT_MS)
            expect(page.locator("#whoami")).to_contain_text("as dev on node")
            messages = page.locator("#messages li")
            expect(messages.filter(has_text="subscribed to demo.chat")).to_have_count(
                1, timeout=UI_WAIT_MS)
            # The token travels in the first message, never in the WebSocket URL.
            assert socket_urls == [f"ws://127.0.0.1:{server.port}/ws"]
            # The page runs on the client the node serves.
            assert f"{server.http}/wsbroker.js" in requests

            published = subprocess.run(
                [sys.executable, "-m", "wsbroker", "publish", "demo.chat", '{"hello":"browser"}',
                 "--url", server.url, "--token", token],
                capture_output=True, text=True, timeout=20, env=clean_env())
            assert published.returncode == 0, published.stderr
            received = messages.filter(has_text='{"hello":"browser"}')
            expect(received).to_have_count(1, timeout=UI_WAIT_MS)
            expect(received.locator(".meta")).to_have_text("demo.chat from dev")

            listener = subprocess.Popen(
                [sys.executable, "-m", "wsbroker", "listen", server.url, "demo.chat",
                 "--token", token, "--count", "1"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env())
            wait_for(lambda: subscriptions(server) >= 2, "the listener's subscription")
            page.fill("#message", "hi from the page")
            page.click("#publish")
            out, err = listener.communicate(timeout=15)
            assert listener.returncode == 0, err.decode()
            line = orjson.loads(out.decode().strip())
            assert line == {"type": "message", "channel": "demo.chat",
                            "data": "hi from the page", "from": "dev"}
            expect(messages.filter(has_text='"hi from the page"')).to_have_count(
                1, timeout=UI_WAIT_MS)
            expect(page.locator("#message")).to_have_value("")
            assert page_errors == []
            page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            if listener is not None and listener.poll() is None:
                listener.kill()
                listener.wait(5)
            browser.close()
    assert SCREENSHOT.stat().st_size > 0


def test_demo_page_without_token_says_how_to_get_one(
    dev_server: tuple[ServerProcess, str, str],
) -> None:
    """Opened without #token=…, the page opens no WebSocket and tells the user what to do."""
    from playwright.sync_api import expect, sync_playwright

    server, _, _ = dev_server
    socket_urls: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("websocket", lambda ws: socket_urls.append(ws.url))
            page.goto(server.http + "/")
            expect(page.locator("#status")).to_contain_text("no token", timeout=UI_WAIT_MS)
            expect(page.locator("#status")).to_contain_text("wsbroker serve --dev")
        finally:
            browser.close()
    assert socket_urls == []


def test_demo_page_reconnects_after_a_restart(server_process: StartServer) -> None:
    """When the node restarts (close 1012), the page shows it, wsbroker.js reconnects with backoff,
    goes online again and is subscribed to its channel again."""
    from playwright.sync_api import expect, sync_playwright

    args = ("--dev", "--jwt-secret", "demo-restart-secret-0123456789abcdef", "--drain-seconds",
            "0.2")
    first = server_process(*args, env=clean_env())
    wait_for(lambda: "demo: " in first.stdout, "the dev banner")
    demo = re.search(r"^demo: (\S+)$", first.stdout, re.MULTILINE)
    assert demo, first.stdout
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(demo.group(1))
            status = page.locator("#status")
            expect(status).to_have_text("online", timeout=UI_WAIT_MS)
            first.signal()
            expect(status).to_have_text(re.compile(r"reconnecting \(1012"), timeout=UI_WAIT_MS)
            assert first.wait(15) == 0
            server_process(*args, env=clean_env(), port=first.port)
            expect(status).to_have_text("online", timeout=UI_WAIT_MS)
            expect(page.locator("#messages li", has_text="subscribed to demo.chat")).to_have_count(
                2, timeout=UI_WAIT_MS)
        finally:
            browser.close()
