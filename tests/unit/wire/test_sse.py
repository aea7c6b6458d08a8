import json

import pytest

from addon.wire.sse import SSEDecoder, encode_data

STREAM = (
    b"event: message_start\r\ndata: {\"a\": 1}\r\n\r\n"
    b": keep-alive comment\n\n"
    b"data: line one\ndata: line two\n\n"
    b"event: ping\ndata: {}\n\n"
    + 'data: {"t": "café ✓"}\n\n'.encode()  # multi-byte characters: split points fall inside them
)
EXPECTED = [("message_start", '{"a": 1}'), (None, "line one\nline two"), ("ping", "{}"), (None, '{"t": "café ✓"}')]


def decode_all(pieces):
    d = SSEDecoder()
    out = []
    for p in pieces:
        out += d.feed(p)
    return out + d.flush()


def test_whole_stream():
    assert decode_all([STREAM]) == EXPECTED


def test_every_split_point_gives_the_same_events():
    for i in range(len(STREAM) + 1):
        assert decode_all([STREAM[:i], STREAM[i:]]) == EXPECTED, i
    assert decode_all([bytes([b]) for b in STREAM]) == EXPECTED


def test_final_event_without_blank_line_is_flushed():
    assert decode_all([b"data: last"]) == [(None, "last")]
    assert decode_all([b""]) == []


def test_events_come_out_as_soon_as_complete():
    d = SSEDecoder()
    assert d.feed(b"data: 1\n") == []
    assert d.feed(b"\ndata: 2") == [(None, "1")]


def test_encode_data_is_compact_utf8():
    assert encode_data({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()


@pytest.mark.parametrize("value", [
    {"a": [1, 2.5, None, True, "é\n\"\u2028", {"b": {}}], 1: 2, "big": 2**80, "f": 1e16},
    "x", 5, [], float("nan"), {"nested": [[{"deep": [1e-7]}]]},
])
def test_the_reused_encoders_write_what_jsonencoder_writes(value):
    from addon.wire.sse import compact_json, json_encoder

    assert compact_json(value) == json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode(value)
    assert json_encoder(", ", ": ")(value) == json.dumps(value, ensure_ascii=False)


def test_the_reused_encoder_refuses_what_jsonencoder_refuses():
    from addon.wire.sse import compact_json

    with pytest.raises(TypeError, match="not JSON serializable"):
        compact_json({"a": object()})
    with pytest.raises(TypeError, match="keys must be"):
        compact_json({(1, 2): 3})
    assert compact_json({"after": "errors"}) == '{"after":"errors"}'
