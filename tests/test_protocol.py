"""The sans-I/O protocol: parsing client frames, encoding server frames (SPEC §4–6)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from wsbroker import protocol
from wsbroker.hub import Outgoing
from wsbroker.protocol import ProtocolError, parse_op


def parse_error(frame: str | bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_op(frame)
    return info.value


def test_every_op_parses_to_its_type() -> None:
    assert parse_op('{"op":"auth","token":"t","id":1}') == protocol.Auth(1, "t")
    assert parse_op('{"op":"subscribe","channel":"a.b"}') == protocol.Subscribe(None, "a.b")
    assert parse_op('{"op":"unsubscribe","channel":"a","id":"x"}') == protocol.Unsubscribe(
        "x", "a")
    assert parse_op('{"op":"publish","channel":"a","data":{"k":[1,2]}}') == protocol.Publish(
        None, "a", b'{"k":[1,2]}')
    assert parse_op('{"op":"history","channel":"a"}') == protocol.History(None, "a", 50)
    assert parse_op('{"op":"history","channel":"a","limit":1000}').limit == 1000  # type: ignore[union-attr]
    assert parse_op('{"op":"ping","id":9}') == protocol.Ping(9)


def test_subscribe_since_is_parsed() -> None:
    op = parse_op('{"op":"subscribe","channel":"a","since":{"offset":3,"epoch":"e"}}')
    assert op == protocol.Subscribe(None, "a", protocol.Since(3, "e"))


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "bad_request"),
        ("[1,2]", "bad_request"),
        ('"string"', "bad_request"),
        ("{}", "bad_request"),
        ('{"op":"nope"}', "bad_request"),
        ('{"op":7}', "bad_request"),
        ('{"op":"subscribe"}', "bad_request"),
        ('{"op":"subscribe","channel":5}', "bad_request"),
        ('{"op":"subscribe","channel":"a..b"}', "invalid_channel"),
        ('{"op":"subscribe","channel":"a.*"}', "invalid_channel"),
        ('{"op":"subscribe","channel":"a","since":5}', "bad_request"),
        ('{"op":"subscribe","channel":"a","since":{"offset":-1,"epoch":"e"}}', "bad_request"),
        ('{"op":"publish","channel":"a"}', "bad_request"),
        ('{"op":"publish","channel":">","data":1}', "invalid_channel"),
        ('{"op":"history","channel":"a","limit":0}', "bad_request"),
        ('{"op":"history","channel":"a","limit":1001}', "bad_request"),
        ('{"op":"history","channel":"a","limit":"5"}', "bad_request"),
        ('{"op":"auth"}', "bad_request"),
        ('{"op":"auth","token":""}', "bad_request"),
        ('{"op":"ping","id":true}', "bad_request"),
        ('{"op":"ping","id":[1]}', "bad_request"),
        ('{"op":"publish","channel":"a","data":' + "[" * 256 + "]" * 256 + "}", "bad_request"),
        ('{"op":' + "[" * 1000 + "]" * 1000 + "}", "bad_request"),
    ],
)
def test_bad_frames_get_their_error_code(frame: str, code: str) -> None:
    assert parse_error(frame).code == code


def test_errors_carry_the_op_id_when_there_is_one() -> None:
    assert parse_error('{"op":"nope","id":4}').op_id == 4
    assert parse_error('{"op":"subscribe","channel":"..","id":"s"}').op_id == "s"
    assert parse_error("garbage").op_id is None


def test_replies_echo_id_only_when_given() -> None:
    assert orjson.loads(protocol.encode_ok(3, channel="a")) == {"type": "ok", "id": 3,
                                                               "channel": "a"}
    assert orjson.loads(protocol.encode_ok(None)) == {"type": "ok"}
    error = orjson.loads(protocol.encode_error(None, "forbidden", "no"))
    assert error == {"type": "error", "code": "forbidden", "message": "no"}


def test_message_frame_splices_data_byte_for_byte() -> None:
    frame = protocol.encode_message("c", b'{"b": 1,  "a":[ ]}', sender="u", offset=7)
    assert frame == b'{"type":"message","channel":"c","data":{"b": 1,  "a":[ ]},' \
                    b'"from":"u","offset":7}'
    assert orjson.loads(frame)["data"] == {"b": 1, "a": []}


@pytest.mark.parametrize("payload", [b'{"x":1}', b"[1,2]", b'"text"', b"42", b"null", b"true"])
def test_raw_payloads_are_kept_as_published(payload: bytes) -> None:
    envelope = protocol.decode_payload(payload)
    assert envelope.data == payload
    assert envelope.sender is None


def test_envelopes_round_trip() -> None:
    payload = protocol.encode_envelope(b'{"p":1}', sender="bob", offset=3, epoch="E")
    assert payload.startswith(b"wsb1")
    envelope = protocol.decode_payload(payload)
    assert (orjson.loads(envelope.data), envelope.sender, envelope.offset, envelope.epoch) == (
        {"p": 1}, "bob", 3, "E")


@pytest.mark.parametrize(
    "payload",
    [b"", b"not json", b"{", b"wsb1", b"wsb1[1]", b'wsb1{"from":"x"}', b'wsb1{"data":1,"from":2}',
     b'wsb1{"data":1,"offset":"3"}', b"\xff\xfe", b'wsb1{"data":' + b"[" * 300 + b"]" * 300 + b"}"],
)
def test_invalid_payloads_are_refused(payload: bytes) -> None:
    with pytest.raises(ValueError):
        protocol.decode_payload(payload)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 100_000])
def test_text_frames_have_rfc6455_headers(size: int) -> None:
    payload = b"x" * size
    frame = protocol.text_frame(payload)
    assert frame[0] == 0x81  # FIN + text, never masked
    if size < 126:
        assert frame[1] == size and frame[2:] == payload
    elif size < 65536:
        assert frame[1] == 126 and int.from_bytes(frame[2:4], "big") == size
        assert frame[4:] == payload
    else:
        assert frame[1] == 127 and int.from_bytes(frame[2:10], "big") == size
        assert frame[10:] == payload


@pytest.mark.parametrize("channel", ["prices.btc", 'odd"\\name', "ünïcode.chan"])
@pytest.mark.parametrize("data", [b"1", b'{"a":[1,2]}', b'"' + b"x" * 200 + b'"',
                                  b'"' + b"y" * 70_000 + b'"'])
def test_a_prefixed_message_frame_is_the_encoded_message_framed(channel: str,
                                                                data: bytes) -> None:
    """The fan-out's fast path for raw JSON builds exactly what the general path builds."""
    fast = Outgoing.message(protocol.message_prefix(channel), data)
    general = Outgoing.of(protocol.encode_message(channel, data))
    assert fast == general
    assert fast.payload == protocol.encode_message(channel, data)
    assert orjson.loads(fast.payload) == {"type": "message", "channel": channel,
                                          "data": orjson.loads(data)}


def test_welcome_has_the_spec_fields() -> None:
    welcome: dict[str, Any] = orjson.loads(protocol.encode_welcome("c1", "u", "n", 99, op_id=2))
    assert welcome == {"type": "welcome", "id": 2, "client": "c1", "user": "u", "node": "n",
                       "expires": 99}
