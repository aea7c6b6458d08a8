"""addon/wire/tokens.py: usage from bodies and from client-bound streams, split at every byte."""

import json

import pytest

from addon.wire.tokens import Price
from addon.wire.tokens import StreamUsage, Usage, client_wants_stream_usage, cost, request_stream_usage, usage_from_body
from tests.conftest import SHARED_REFERENCE
from tests.fakeprovider import openai_stream


def sse(*chunks) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def chunk(delta, finish=None, **extra):
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


DEEPSEEK = sse(
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "hi"}),
    chunk({"content": ""}, "stop", usage={"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13,
                                           "prompt_cache_hit_tokens": 4, "prompt_cache_miss_tokens": 6}),
)
OPENAI = b"".join(openai_stream({"model": "gpt-4o"}))


def run(watcher: StreamUsage, stream: bytes, size: int) -> bytes:
    out = []
    for i in range(0, len(stream), size):
        sent = watcher.feed(stream[i:i + size])
        assert b"" not in sent  # an empty piece would end an HTTP/1.1 chunked body
        out += sent
    out += watcher.feed(b"")
    return b"".join(out)


def events(stream: bytes) -> list:
    return [json.loads(e[6:]) for e in stream.split(b"\n\n") if e.startswith(b"data: {")]


@pytest.mark.parametrize("size", [1, 7, 64, 100000])
def test_openai_usage_chunk_is_counted_and_removed_when_the_client_did_not_ask(size):
    watcher = StreamUsage(strip=True)
    out = run(watcher, OPENAI, size)
    assert watcher.usage == Usage(5, 2, 0)
    assert all(e["choices"] for e in events(out))  # no choices:[] chunk left
    assert out == OPENAI.replace(OPENAI.split(b"\n\n")[-3] + b"\n\n", b"")  # everything else byte for byte
    assert out.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("size", [1, 13, 100000])
def test_usage_passes_untouched_when_the_client_asked(size):
    watcher = StreamUsage(strip=False)
    assert run(watcher, OPENAI, size) == OPENAI
    assert watcher.usage == Usage(5, 2, 0)


@pytest.mark.parametrize("size", [1, 9, 100000])
def test_deepseek_usage_on_the_last_content_chunk_keeps_the_chunk_without_usage(size):
    watcher = StreamUsage(strip=True)
    out = run(watcher, DEEPSEEK, size)
    assert watcher.usage == Usage(10, 3, 4)
    last = events(out)[-1]
    assert "usage" not in last and last["choices"][0]["finish_reason"] == "stop"
    assert len(events(out)) == 3


def test_usage_null_on_every_chunk_is_not_usage_and_is_left_alone():
    stream = sse(chunk({"content": "a"}, usage=None), chunk({}, "stop", usage=None))
    watcher = StreamUsage(strip=True)
    assert run(watcher, stream, 5) == stream
    assert watcher.usage is None


def test_crlf_framed_events_and_a_final_event_without_blank_line():
    stream = (b'data: {"choices":[{"delta":{"content":"x"}}]}\r\n\r\n'
              b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}')
    watcher = StreamUsage(strip=True)
    out = run(watcher, stream, 3)
    assert out == b'data: {"choices":[{"delta":{"content":"x"}}]}\r\n\r\n'
    assert watcher.usage == Usage(1, 1, 0)


def test_cr_framed_events_are_passed_on_as_they_complete():
    first = b'data: {"choices":[{"delta":{"content":"x"}}]}\r\r'
    watcher = StreamUsage(strip=True)
    assert watcher.feed(first + b"data: {") == [first]  # not held until the stream ends
    rest = watcher.feed(b'"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}\r\r')
    assert rest == [] and watcher.usage == Usage(1, 1, 0)


def test_unparseable_event_mentioning_usage_is_passed_on():
    stream = b'data: {"usage": {broken\n\n'
    watcher = StreamUsage(strip=True)
    assert run(watcher, stream, 4) == stream
    assert watcher.usage is None


@pytest.mark.skipif(not SHARED_REFERENCE.exists(), reason="recorded reference traffic not present")
def test_recorded_openai_stream():
    stream = (SHARED_REFERENCE / "recorded/openai/openaipy_text_stream_with_usage.sse").read_bytes()
    watcher = StreamUsage(strip=True)
    out = run(watcher, stream, 37)
    assert watcher.usage == Usage(14, 30, 0)
    assert b'"choices":[]' not in out and b"[DONE]" in out


def test_usage_from_bodies():
    body = {
        "choices": [],
        "usage": {"prompt_tokens": 20, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 8}},
    }
    assert usage_from_body(json.dumps(body).encode()) == Usage(20, 5, 8)
    assert usage_from_body(b'{"error": {"message": "x"}}') is None
    assert usage_from_body(b"<html>usage</html>") is None
    assert usage_from_body(b'{"usage": null}') is None


def test_usage_from_bodies_that_mention_usage_more_than_once():
    # the word in the answer (escaped quotes inside a string), and as a value: still the real usage
    answer = {"choices": [{"message": {"content": 'he wrote {"usage": {"prompt_tokens": 999}}', "role": "usage"}}],
              "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
    for body in (json.dumps(answer).encode(), json.dumps(answer, separators=(",", ":")).encode()):
        assert usage_from_body(body) == Usage(7, 3, 0)
    # a single usage key, pretty-printed with whitespace, followed by more keys
    pretty = json.dumps({"usage": {"prompt_tokens": 4, "completion_tokens": 2}, "system_fingerprint": "fp"}, indent=2)
    assert usage_from_body(pretty.encode()) == Usage(4, 2, 0)
    assert usage_from_body(b'{"usage": {"prompt_tokens": 4, "completion') is None  # cut off


def test_cost_uses_the_cached_price_for_cached_tokens():
    price = Price(input=2.0, output=10.0, cached_input=1.0)
    assert cost(Usage(1_000_000, 100_000, 0), price) == pytest.approx(3.0)
    assert cost(Usage(1_000_000, 0, 500_000), price) == pytest.approx(1.5)
    assert cost(Usage(1_000_000, 0, 500_000), Price(2.0, 10.0)) == pytest.approx(2.0)
    assert cost(Usage(10, 10, 0), None) == 0.0


def test_request_stream_usage_keeps_other_stream_options():
    body = {"model": "m", "stream": True, "stream_options": {"foo": 1}}
    assert not client_wants_stream_usage(body)
    raw = request_stream_usage(body, json.dumps(body).encode())
    assert body["stream_options"] == {"foo": 1, "include_usage": True}
    assert json.loads(raw) == body and client_wants_stream_usage(body)


def test_request_stream_usage_leaves_the_rest_of_the_clients_bytes_alone():
    # number formats, escapes and key order a re-encoding would change
    raw = b' {"model": "m", "temperature": 1.0E0, "messages": [{"role": "user", "content": "caf\\u00e9"}], "stream": true}'
    body = json.loads(raw)
    sent = request_stream_usage(body, raw)
    assert sent == b' {"stream_options":{"include_usage":true},' + raw[2:]
    assert json.loads(sent) == body and body["stream_options"] == {"include_usage": True}
    # JSON in UTF-16 (json.loads reads it): re-encoded, never spliced into
    utf16 = json.dumps({"model": "m", "messages": [], "stream": True}).encode("utf-16")
    body = json.loads(utf16)
    assert json.loads(request_stream_usage(body, utf16))["stream_options"] == {"include_usage": True}
