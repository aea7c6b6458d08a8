import gzip
import json
import zlib

from mitmproxy import http

from addon.wire.streams import fail_closed_stream


def upper(piece: bytes):
    return piece.upper() if piece else b"<end>"


def run(stream, pieces):
    out = []
    for p in list(pieces) + [b""]:
        r = stream(p)
        out.extend([r] if isinstance(r, bytes) else list(r))
    return b"".join(out), out


def test_plain_pieces_and_framing_headers():
    headers = http.Headers(content_type="text/event-stream", content_length="10")
    stream = fail_closed_stream(upper, headers, "HTTP/1.1")
    assert "content-length" not in headers and headers["transfer-encoding"] == "chunked"
    body, _ = run(stream, [b"ab", b"cd"])
    assert body == b"ABCD<end>"


def test_http2_gets_no_transfer_encoding():
    headers = http.Headers(content_type="text/event-stream")
    fail_closed_stream(upper, headers, "HTTP/2.0")
    assert "transfer-encoding" not in headers


def test_gzip_is_decoded_before_translation():
    raw = b"data: one\n\ndata: two\n\n"
    z = gzip.compress(raw)
    headers = http.Headers(content_encoding="gzip")
    stream = fail_closed_stream(upper, headers, "HTTP/1.1")
    assert "content-encoding" not in headers
    body, parts = run(stream, [z[i:i + 3] for i in range(0, len(z), 3)])
    assert body == raw.upper() + b"<end>"
    assert b"" not in parts[:-1]  # never an empty chunk before the end


def test_deflate_is_decoded():
    raw = b"data: x\n\n"
    c = zlib.compressobj()
    z = c.compress(raw) + c.flush()
    body, _ = run(fail_closed_stream(upper, http.Headers(content_encoding="deflate"), "HTTP/1.1"), [z])
    assert body == raw.upper() + b"<end>"


def test_empty_translation_of_a_piece_is_never_b_empty():
    stream = fail_closed_stream(lambda p: b"", http.Headers(), "HTTP/1.1")
    assert stream(b"partial") == []
    assert stream(b"") == b""


def test_translator_exception_ends_the_stream_with_an_openai_error():
    calls = []

    def broken(piece):
        calls.append(piece)
        if piece == b"bad":
            raise ValueError("boom")
        return piece

    stream = fail_closed_stream(broken, http.Headers(), "HTTP/1.1")
    assert stream(b"ok") == b"ok"
    out = b"".join(stream(b"bad"))
    event = json.loads(out.split(b"\n\n")[0][len(b"data: "):])
    assert event["error"]["code"] == "gateway_error"
    assert out.endswith(b"data: [DONE]\n\n")
    assert stream(b"more") == [] and stream(b"") == b""
    assert calls == [b"ok", b"bad"]  # nothing more reaches the translator after the failure
