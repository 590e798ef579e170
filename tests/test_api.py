"""The HTTP API on one node (SPEC §12): endpoints, errors, keys, keep-alive, bad input."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.api_client import (
    AUTH,
    KEY,
    OLD_KEY,
    Api,
    api,
    api_url,
    post_head,
    raw_request,
    read_until_closed,
)
from tests.conftest import NodeFactory, http_url, ws_url
from tests.helpers import SECRET, Client, eventually, http_get, make_token
from wsbroker.api.idempotency import MemoryIdempotency
from wsbroker.api.server import ApiServer
from wsbroker.backplane import BackplaneUnavailable
from wsbroker.channels import PatternSet
from wsbroker.cli import main as cli_main
from wsbroker.history import HistoryRules, Published
from wsbroker.server import Node


@pytest.fixture
async def node(start_node: NodeFactory) -> Node:
    return await start_node(api_port=0, api_key=(KEY, OLD_KEY))


@pytest.fixture
async def client(node: Node) -> AsyncIterator[Api]:
    async with api(node) as session:
        yield session


async def assert_websockets_still_served(node: Node) -> None:
    async with Client.connect(ws_url(node), make_token("probe")) as probe:
        assert (await probe.request("ping"))["type"] == "ok"


# -- endpoints -------------------------------------------------------------------


async def test_publish_reaches_subscribers_as_a_backend_message(node: Node, client: Api) -> None:
    async with Client.connect(ws_url(node), make_token()) as alice:
        await alice.subscribe("news.today")
        status, answer = await client.post("/api/publish",
                                           {"channel": "news.today", "data": {"n": 1}})
        assert (status, answer) == (200, {"channel": "news.today"})
        message = await alice.next_message()
    assert message == {"type": "message", "channel": "news.today", "data": {"n": 1}}


async def test_publish_takes_null_data_but_not_missing_data(node: Node, client: Api) -> None:
    async with Client.connect(ws_url(node), make_token()) as alice:
        await alice.subscribe("news.today")
        status, _ = await client.post("/api/publish", {"channel": "news.today", "data": None})
        assert status == 200
        assert (await alice.next_message())["data"] is None
    status, answer = await client.post("/api/publish", {"channel": "news.today"})
    assert status == 400 and answer["error"]["code"] == "bad_request"


async def test_broadcast_answers_per_channel_in_request_order(node: Node, client: Api) -> None:
    async with Client.connect(ws_url(node), make_token()) as alice:
        await alice.subscribe("room.a")
        await alice.subscribe("room.b")
        status, answer = await client.post(
            "/api/broadcast", {"channels": ["room.b", "bad..name", "room.a"], "data": "hi"})
        assert status == 200
        assert answer["results"][0] == {"channel": "room.b"}
        assert answer["results"][1]["channel"] == "bad..name"
        assert answer["results"][1]["error"]["code"] == "invalid_channel"
        assert answer["results"][2] == {"channel": "room.a"}
        received = {(await alice.next_message())["channel"] for _ in range(2)}
    assert received == {"room.a", "room.b"}


@pytest.mark.parametrize("channels", [[], ["a"] * 1001, "room.a", [1]])
async def test_broadcast_needs_1_to_1000_channel_names(client: Api, channels: object) -> None:
    status, answer = await client.post("/api/broadcast", {"channels": channels, "data": 1})
    assert status == 400 and answer["error"]["code"] == "bad_request"


async def test_disconnect_closes_every_connection_of_the_user_with_4003(
    node: Node, client: Api
) -> None:
    async with (
        Client.connect(ws_url(node), make_token("alice")) as first,
        Client.connect(ws_url(node), make_token("alice"), how="message") as second,
        Client.connect(ws_url(node), make_token("bob")) as bob,
    ):
        status, answer = await client.post("/api/disconnect", {"user": "alice"})
        assert (status, answer) == (200, {"user": "alice"})
        assert (await first.closed())[0] == 4003
        assert (await second.closed())[0] == 4003
        assert (await bob.request("ping"))["type"] == "ok"


async def test_channels_lists_subscribed_channels_sorted_and_by_pattern(
    node: Node, client: Api
) -> None:
    async with Client.connect(ws_url(node), make_token()) as alice:
        for channel in ("prices.b", "prices.a", "chat.x"):
            await alice.subscribe(channel)
        assert await client.get("/api/channels") == (
            200, {"channels": ["chat.x", "prices.a", "prices.b"]})
        assert await client.get("/api/channels?pattern=prices.*") == (
            200, {"channels": ["prices.a", "prices.b"]})
        status, answer = await client.get("/api/channels?pattern=a..b")
        assert status == 400 and answer["error"]["code"] == "invalid_channel"

    async def vacated() -> bool:  # unsubscribed when the client left
        return (await client.get("/api/channels"))[1] == {"channels": []}

    await eventually(vacated)


async def test_info_reports_the_node(node: Node, client: Api) -> None:
    async with Client.connect(ws_url(node), make_token()) as alice:
        await alice.subscribe("room.a")
        status, answer = await client.get("/api/info")
    assert status == 200
    [report] = answer["nodes"]
    assert report["node"] == "test-node"
    assert (report["connections"], report["subscriptions"], report["channels"]) == (1, 1, 1)
    assert report["uptime_s"] >= 0 and report["version"]


async def test_publish_records_history_and_history_reads_it(start_node: NodeFactory) -> None:
    node = await start_node(api_port=0, api_key=(KEY,),
                            history=HistoryRules.parse(["chat.>=100"]))
    async with Client.connect(ws_url(node), make_token()) as alice, api(node) as client:
        await alice.subscribe("chat.room")
        answers = [await client.post("/api/publish", {"channel": "chat.room", "data": n})
                   for n in (1, 2, 3)]
        assert [a["offset"] for _, a in answers] == [1, 2, 3]
        epoch = answers[0][1]["epoch"]
        assert answers[2] == (200, {"channel": "chat.room", "offset": 3, "epoch": epoch})
        assert (await alice.next_message()) == {
            "type": "message", "channel": "chat.room", "data": 1, "offset": 1}
        status, page = await client.get("/api/history?channel=chat.room&limit=2")
        assert status == 200
        assert page == {"channel": "chat.room", "offset": 3, "epoch": epoch, "messages": [
            {"type": "message", "channel": "chat.room", "data": 2, "offset": 2},
            {"type": "message", "channel": "chat.room", "data": 3, "offset": 3}]}
        assert len((await client.get("/api/history?channel=chat.room"))[1]["messages"]) == 3
        # The idempotent repeat answers the first offset, and records nothing.
        body = {"channel": "chat.room", "data": 4, "idempotency_key": "k"}
        assert (await client.post("/api/publish", body))[1]["offset"] == 4
        assert (await client.post("/api/publish", body))[1]["offset"] == 4
        assert (await client.get("/api/history?channel=chat.room"))[1]["offset"] == 4


@pytest.mark.parametrize(("query", "code"), [
    ("channel=news.today", "not_enabled"),  # no --history for it
    ("channel=a..b", "invalid_channel"),
    ("", "bad_request"),
    ("channel=chat.room&limit=0", "bad_request"),
    ("channel=chat.room&limit=1001", "bad_request"),
    ("channel=chat.room&limit=ten", "bad_request"),
])
async def test_history_errors(start_node: NodeFactory, query: str, code: str) -> None:
    node = await start_node(api_port=0, api_key=(KEY,),
                            history=HistoryRules.parse(["chat.>=100"]))
    async with api(node) as client:
        status, answer = await client.get(f"/api/history?{query}")
    assert status == 400 and answer["error"]["code"] == code


async def test_presence_and_presence_stats_list_members(start_node: NodeFactory) -> None:
    node = await start_node(api_port=0, api_key=(KEY,), presence=PatternSet.parse(["chat.>"]))
    async with (
        Client.connect(ws_url(node), make_token("alice", info={"name": "Alice"})) as alice,
        Client.connect(ws_url(node), make_token("alice")) as alice_again,
        Client.connect(ws_url(node), make_token("bob")) as bob,
        api(node) as client,
    ):
        for member in (alice, alice_again, bob):
            await member.subscribe("chat.room")
        status, answer = await client.get("/api/presence?channel=chat.room")
        assert status == 200 and answer["channel"] == "chat.room"
        assert sorted((m["user"], str(m.get("info"))) for m in answer["members"]) == [
            ("alice", "None"), ("alice", "{'name': 'Alice'}"), ("bob", "None")]
        assert {m["client"] for m in answer["members"]} == {
            c.welcome["client"] for c in (alice, alice_again, bob) if c.welcome}
        assert await client.get("/api/presence_stats?channel=chat.room") == (
            200, {"channel": "chat.room", "clients": 3, "users": 2})


@pytest.mark.parametrize(("query", "code"), [
    ("channel=news.today", "not_enabled"),  # no --presence for it
    ("channel=a..b", "invalid_channel"),
    ("", "bad_request"),
])
@pytest.mark.parametrize("path", ["/api/presence", "/api/presence_stats"])
async def test_presence_errors(start_node: NodeFactory, path: str, query: str,
                               code: str) -> None:
    node = await start_node(api_port=0, api_key=(KEY,), presence=PatternSet.parse(["chat.>"]))
    async with api(node) as client:
        status, answer = await client.get(f"{path}?{query}")
    assert status == 400 and answer["error"]["code"] == code


# -- keys --------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [
    {"Authorization": f"Bearer {KEY}"},
    {"X-API-Key": KEY},
    {"Authorization": f"Bearer {OLD_KEY}"},  # rotation: every listed key is accepted
    {"X-API-Key": OLD_KEY},
])
async def test_any_configured_key_in_either_header_is_accepted(
    client: Api, headers: dict[str, str]
) -> None:
    assert (await client.get("/api/info", headers=headers))[0] == 200


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong-key-0123456789abcdef"}, {"X-API-Key": KEY[:-1]},
    {"Authorization": f"Basic {KEY}"}, {"X-API-Key": KEY + "x"},
])
async def test_no_or_wrong_key_is_401_before_anything_else(
    client: Api, headers: dict[str, str]
) -> None:
    answers = [
        await client.get("/api/info", headers=headers),
        await client.get("/no/such/path", headers=headers),  # not 404
        await client.call("DELETE", "/api/publish", headers=headers),  # not 405
        await client.post("/api/publish", None, raw=b"{not json", headers=headers),  # not 400
    ]
    for status, answer in answers:
        assert status == 401
        assert answer == {"error": {"code": "unauthorized",
                                    "message": "a valid API key is required"}}


# -- errors ---------------------------------------------------------------------------


async def test_unknown_path_is_404_and_wrong_method_405(client: Api) -> None:
    status, answer = await client.get("/api/nothing")
    assert status == 404 and answer["error"]["code"] == "not_found"
    async with client.session.get(client.url + "/api/publish", headers=AUTH) as response:
        assert response.status == 405
        assert response.headers["Allow"] == "POST"
    status, _ = await client.post("/api/info", {})
    assert status == 405


@pytest.mark.parametrize(("raw", "code"), [
    (b"{not json", "bad_request"),
    (b"", "bad_request"),
    (b"[1, 2]", "bad_request"),
    (b'{"channel": 5, "data": 1}', "bad_request"),
    (b'{"channel": "a..b", "data": 1}', "invalid_channel"),
    (b'{"channel": "a", "data": 1, "idempotency_key": 7}', "bad_request"),
    (b'{"channel": "a", "data": 1, "idempotency_key": ""}', "bad_request"),
])
async def test_bad_bodies_are_400_with_a_code(client: Api, raw: bytes, code: str) -> None:
    status, answer = await client.post("/api/publish", None, raw=raw)
    assert status == 400
    assert answer["error"]["code"] == code and answer["error"]["message"]


async def test_disconnect_needs_a_user(client: Api) -> None:
    for body in ({}, {"user": ""}, {"user": 5}):
        status, answer = await client.post("/api/disconnect", body)
        assert status == 400 and answer["error"]["code"] == "bad_request"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
async def test_a_body_that_is_not_json_is_415(client: Api, content_type: str) -> None:
    status, answer = await client.post("/api/publish", None, raw=b'{"channel":"a","data":1}',
                                       content_type=content_type)
    assert status == 415 and answer["error"]["code"] == "unsupported_media_type"


async def test_metrics_count_requests_by_endpoint_and_status(node: Node, client: Api) -> None:
    await client.post("/api/publish", {"channel": "a", "data": 1})
    await client.post("/api/publish", {"channel": "a", "data": 1})
    await client.get("/whatever", headers={})
    await client.get(f"/random/{time.time()}")
    _, _, text = await asyncio.to_thread(http_get, http_url(node) + "/metrics")
    assert 'wsbroker_api_requests_total{endpoint="/api/publish",status="200"} 2.0' in text
    assert 'wsbroker_api_requests_total{endpoint="other",status="401"} 1.0' in text
    assert 'wsbroker_api_requests_total{endpoint="other",status="404"} 1.0' in text


# -- HTTP ------------------------------------------------------------------------------


async def test_requests_share_one_keep_alive_connection(node: Node) -> None:
    opened = 0

    async def on_connection(*_: object) -> None:
        nonlocal opened
        opened += 1

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_connection)
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
        for _ in range(5):
            async with session.post(api_url(node) + "/api/publish", headers=AUTH,
                                    json={"channel": "a", "data": 1}) as response:
                assert response.status == 200
        assert (await session.get(api_url(node) + "/api/nothing", headers=AUTH)).status == 404
        async with session.get(api_url(node) + "/api/info", headers=AUTH) as response:
            assert response.status == 200
    assert opened == 1


async def test_expect_100_continue_is_answered_before_the_body(node: Node) -> None:
    body = b'{"channel": "a", "data": 1}'
    reader, writer = await raw_request(
        node, post_head("/api/publish", len(body), extra="Expect: 100-continue\r\n"))
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == (
        b"HTTP/1.1 100 Continue\r\n\r\n")
    writer.write(body)
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 200 ")
    writer.close()


# -- bad input never hurts ----------------------------------------------------------------


async def test_a_body_over_the_limit_is_413_from_its_length_without_reading_it(
    start_node: NodeFactory,
) -> None:
    node = await start_node(api_port=0, api_key=(KEY,), api_max_body=4096)
    # Announces 1 GiB and sends none of it: the answer comes at once.
    reader, writer = await raw_request(node, post_head("/api/publish", 1 << 30))
    answer = await read_until_closed(reader)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b'"code":"too_large"' in answer
    await assert_websockets_still_served(node)


async def test_a_chunked_body_is_cut_at_the_limit(start_node: NodeFactory) -> None:
    node = await start_node(api_port=0, api_key=(KEY,), api_max_body=4096)
    reader, writer = await raw_request(node, post_head("/api/publish", None))
    chunk = b"1000\r\n" + b"x" * 0x1000 + b"\r\n"
    with contextlib.suppress(ConnectionError):
        for _ in range(4):  # 16 KiB, then the server answers and closes
            writer.write(chunk)
            await writer.drain()
    answer = await read_until_closed(reader)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 413 ")


async def test_a_slow_body_is_cut_after_the_body_timeout(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ApiServer, "body_timeout", 0.5)
    reader, writer = await raw_request(node, post_head("/api/publish", 100))
    started = time.monotonic()

    async def trickle() -> None:  # one byte every 0.1 s: would take 10 s
        with contextlib.suppress(ConnectionError):
            for _ in range(100):
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(0.1)

    trickler = asyncio.create_task(trickle())
    try:
        await assert_websockets_still_served(node)  # meanwhile
        answer = await read_until_closed(reader)
    finally:
        trickler.cancel()
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - started < 3


async def test_idle_and_half_sent_connections_are_closed_after_the_keepalive_timeout(
    start_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ApiServer, "keepalive_timeout", 0.5)
    node = await start_node(api_port=0, api_key=(KEY,))
    idle_reader, idle = await raw_request(node, b"")
    half_reader, half = await raw_request(node, b"POST /api/publish HTTP/1.1\r\nHost: x")
    started = time.monotonic()
    assert await read_until_closed(idle_reader) == b""
    await read_until_closed(half_reader)
    assert time.monotonic() - started < 3
    idle.close()
    half.close()


async def test_connections_over_the_limit_get_503_and_websockets_go_on(
    start_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ApiServer, "max_connections", 3)
    node = await start_node(api_port=0, api_key=(KEY,))
    held = [await raw_request(node, b"") for _ in range(3)]
    api_server = node.api
    assert api_server is not None
    await eventually(lambda: api_server.connection_count == 3)
    reader, writer = await raw_request(node, b"")
    answer = await read_until_closed(reader)
    assert answer.startswith(b"HTTP/1.1 503 ")
    await assert_websockets_still_served(node)
    for _, held_writer in held:
        held_writer.close()
    writer.close()
    await eventually(lambda: api_server.connection_count == 0)  # the slots come back
    async with api(node) as client:
        assert (await client.get("/api/info"))[0] == 200


@pytest.mark.parametrize("garbage", [
    b"GET /api/info HTTP/1.1\r\nBad Header\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # TLS on the plain port
    b"GET /api/info HTTP/1.1\r\nX-Long: " + b"a" * 10000 + b"\r\n\r\n",
])
async def test_unreadable_http_gets_400_and_no_traceback_in_the_log(
    node: Node, garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    reader, writer = await raw_request(node, garbage)
    answer = await read_until_closed(reader)
    writer.close()
    assert answer.startswith((b"HTTP/1.0 400 ", b"HTTP/1.1 400 "))
    assert not any(record.exc_info for record in caplog.records)
    await assert_websockets_still_served(node)


async def test_many_bad_requests_leave_the_api_and_websockets_serving(
    node: Node, client: Api
) -> None:
    async with Client.connect(ws_url(node), make_token()) as alice:
        await alice.subscribe("room.a")
        bad = [client.post("/api/publish", None, raw=b"\xff" * n) for n in range(1, 50)]
        bad += [client.post("/api/broadcast", {"channels": ["a"] * 1001, "data": 1})] * 5
        results = await asyncio.gather(*bad)
        assert {status for status, _ in results} == {400}
        assert (await client.post("/api/publish", {"channel": "room.a", "data": 1}))[0] == 200
        assert (await alice.next_message())["data"] == 1


# -- idempotency (in-node) -----------------------------------------------------------------


async def test_the_same_idempotency_key_publishes_once(node: Node, client: Api) -> None:
    async with Client.connect(ws_url(node), make_token()) as alice:
        await alice.subscribe("orders.1")
        body = {"channel": "orders.1", "data": "paid", "idempotency_key": "order-1-paid"}
        answers = await asyncio.gather(*(client.post("/api/publish", body) for _ in range(3)))
        answers.append(await client.post("/api/publish", body))
        assert answers == [(200, {"channel": "orders.1"})] * 4
        # Another key, or the same key on another channel, is another publish.
        await client.post("/api/publish", {**body, "idempotency_key": "order-1-shipped",
                                           "data": "shipped"})
        assert (await alice.next_message())["data"] == "paid"
        assert (await alice.next_message())["data"] == "shipped"
        with pytest.raises(TimeoutError):
            await alice.next_message(timeout=0.3)


# -- configuration ----------------------------------------------------------------------


def test_serve_refuses_an_api_port_without_a_key(capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WSB_API_KEY", "WSB_API_PORT"):
        monkeypatch.delenv(name, raising=False)
    code = cli_main(["serve", "--jwt-secret", SECRET, "--api-port", "0"])
    assert code == 2
    assert "--api-key" in capsys.readouterr().err


def test_serve_refuses_a_short_api_key(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["serve", "--jwt-secret", SECRET, "--api-port", "0", "--api-key", "short"])
    assert code == 2
    assert "--api-key" in capsys.readouterr().err


async def test_the_api_is_off_without_a_port(start_node: NodeFactory) -> None:
    node = await start_node(api_key=(KEY,))
    assert node.api is None


async def test_in_node_idempotency_lasts_5_minutes_and_forgets_failures() -> None:
    now = [1000.0]
    keys = MemoryIdempotency(clock=lambda: now[0])
    calls: list[int] = []

    async def publish() -> Published:
        calls.append(1)
        if len(calls) == 1:
            raise BackplaneUnavailable("down")
        return Published(len(calls), "e")

    with pytest.raises(BackplaneUnavailable):
        await keys.once("a", "k", publish)
    assert await keys.once("a", "k", publish) == Published(2, "e")  # the retry publishes
    now[0] += 299
    assert await keys.once("a", "k", publish) == Published(2, "e")  # the first answer again
    assert await keys.once("b", "k", publish) == Published(3, "e")  # another channel
    now[0] += 2
    assert await keys.once("a", "k", publish) == Published(4, "e")  # 5 minutes passed
