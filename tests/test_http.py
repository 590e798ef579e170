"""HTTP on the WebSocket port: probes, metrics, routing, origins (SPEC §9)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.conftest import NodeFactory, http_url, ws_url
from tests.helpers import WAIT, Client, eventually, http_get, make_token
from wsbroker.server import Node


async def get(url: str) -> tuple[int, str, str]:
    return await asyncio.to_thread(http_get, url)


async def test_probes(node: Node) -> None:
    assert (await get(http_url(node) + "/healthz"))[0] == 200
    status, content_type, body = await get(http_url(node) + "/readyz")
    assert (status, body.strip()) == (200, "ready")
    assert content_type.startswith("text/plain")


async def test_metrics_exposes_the_spec_names(node: Node) -> None:
    async with Client.connect(ws_url(node), make_token()) as client:
        await client.subscribe("m")
        await node.backplane.publish("m", b"1")
        await client.next_message()
        status, content_type, body = await get(http_url(node) + "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=")
    for name in ("wsbroker_connections 1.0", "wsbroker_subscriptions 1.0",
                 "wsbroker_channels 1.0", "wsbroker_messages_received_total 1.0",
                 "wsbroker_messages_delivered_total 1.0", "wsbroker_backplane_up 1.0",
                 "wsbroker_backplane_reconnects_total 0.0", "wsbroker_fanout_seconds_count 1.0",
                 "# TYPE wsbroker_messages_dropped_total counter",
                 "# TYPE wsbroker_auth_failures_total counter",
                 "# TYPE wsbroker_disconnects_total counter"):
        assert name in body, name


async def test_message_counts_are_exact_and_one_fanout_in_eight_is_timed(node: Node) -> None:
    """Counts reach /metrics in the loop turn they happen; the histogram samples."""
    async with Client.connect(ws_url(node), make_token()) as a, \
            Client.connect(ws_url(node), make_token()) as b:
        for client in (a, b):
            await client.subscribe("m")
        for index in range(17):
            await node.backplane.publish("m", b"%d" % index)
        for client in (a, b):
            for index in range(17):
                assert (await client.next_message())["data"] == index
        body = (await get(http_url(node) + "/metrics"))[2]
    assert "wsbroker_messages_received_total 17.0" in body
    assert "wsbroker_messages_delivered_total 34.0" in body
    assert "wsbroker_fanout_seconds_count 3.0" in body  # messages 1, 9 and 17


async def test_disconnects_are_counted_by_code(node: Node) -> None:
    async with Client.connect(ws_url(node), make_token()) as client:
        await client.ws.send(b"binary")
        assert (await client.closed())[0] == 1003
    async def counted() -> bool:  # the count lands when the server's handler ends
        return 'wsbroker_disconnects_total{code="1003"} 1.0' in (
            await get(http_url(node) + "/metrics"))[2]

    await eventually(counted)


@pytest.mark.parametrize("path", ["/", "/nope", "/ws/extra", "/metrics/x", "/index.html"])
async def test_other_paths_are_404(node: Node, path: str) -> None:
    assert (await get(http_url(node) + path))[0] == 404


async def test_demo_page_only_in_dev_mode(start_node: NodeFactory) -> None:
    dev = await start_node(dev=True)
    status, content_type, body = await get(http_url(dev) + "/")
    assert status == 200 and content_type.startswith("text/html") and "wsbroker" in body


async def test_ws_without_upgrade_is_426(node: Node) -> None:
    status, _, body = await get(http_url(node) + "/ws")
    assert status == 426 and "WebSocket" in body


async def test_upgrades_elsewhere_are_404(node: Node) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"ws://127.0.0.1:{node.port}/socket?token={make_token()}"):
            pass
    assert refused.value.response.status_code == 404


async def test_allowed_origins(start_node: NodeFactory) -> None:
    node = await start_node(allowed_origins=("https://app.example",))
    token = make_token()
    with pytest.raises(InvalidStatus) as refused:
        async with Client.connect(ws_url(node), token, origin="https://evil.example"):  # type: ignore[arg-type]
            pass
    assert refused.value.response.status_code == 403
    async with Client.connect(ws_url(node), token, origin="https://app.example") as ok:  # type: ignore[arg-type]
        assert ok.welcome is not None
    async with Client.connect(ws_url(node), token) as no_origin:  # not a browser: allowed
        assert no_origin.welcome is not None


async def test_a_refused_handshake_is_plain_text_401(node: Node) -> None:
    with pytest.raises(InvalidStatus) as refused:
        wrong = make_token(secret="a-wrong-secret-of-a-decent-length-0123456")
        async with Client.connect(ws_url(node), wrong):
            pass
    response = refused.value.response
    assert response.status_code == 401
    assert response.headers["Content-Type"].startswith("text/plain")
    assert response.body.decode().count("\n") == 1


async def test_clients_cannot_mint_disconnect_metric_series(node: Node) -> None:
    """A client chooses its own close code; codes the SPEC does not name share a label."""
    for code in (3001, 3002, 4999):
        async with Client.connect(ws_url(node), make_token()) as client:
            await client.ws.close(code, "bye")

    async def counted() -> bool:
        metrics = (await get(http_url(node) + "/metrics"))[2]
        return 'wsbroker_disconnects_total{code="other"} 3.0' in metrics

    await eventually(counted)
    metrics = (await get(http_url(node) + "/metrics"))[2]
    assert 'code="3001"' not in metrics


@pytest.mark.parametrize("header", ["Origin", "Authorization", "Upgrade"])
async def test_a_repeated_header_is_refused_with_400(
    node: Node, header: str, caplog: pytest.LogCaptureFixture
) -> None:
    values = {"Origin": "https://a.example", "Authorization": f"Bearer {make_token()}",
              "Upgrade": "websocket"}
    lines = ["GET /ws HTTP/1.1", f"Host: 127.0.0.1:{node.port}", "Connection: Upgrade",
             "Upgrade: websocket", "Sec-WebSocket-Version: 13",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
             f"{header}: {values[header]}", f"{header}: {values[header]}"]
    if header == "Upgrade":
        lines.remove("Upgrade: websocket")
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        response = await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()
    head, _, body = response.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 400 ")
    assert body == f"the {header} header must appear once\n"
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
