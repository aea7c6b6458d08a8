from addon.sse import SSEDecoder, encode_data

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
