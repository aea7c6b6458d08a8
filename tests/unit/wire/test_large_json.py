"""A large body's JSON, made and read in short C calls (a worker thread's long C call holds the GIL
and stalls the event loop): the pieces give exactly the bytes and the text one call gives, and
a lone surrogate is found wherever the pieces are cut."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from addon.apis import base
from addon.wire import sse
from addon.wire.errors import GatewayError
from tests.conftest import examples

text = st.text(max_size=40) | st.sampled_from(["a\ud800b", "é" * 30, '\n"\\' * 9, "😀" * 20])
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(text, inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=examples(300), deadline=None)
@given(value=values, piece=st.integers(1, 50))
def test_json_in_pieces_is_the_same_bytes_as_one_call(value, piece):
    whole, kept = sse.json_bytes(value), sse.PIECE
    sse.PIECE = piece  # cut strings and containers small: every path is taken
    try:
        assert sse.json_pieces(value) == whole
    finally:
        sse.PIECE = kept


def test_json_bytes_makes_pieces_only_in_a_large_body_thread(monkeypatch):
    calls = []
    monkeypatch.setattr(sse, "json_pieces", lambda obj: calls.append(obj) or b"{}")
    assert sse.json_bytes({"a": 1}) == b'{"a":1}' and calls == []
    done = []

    def worker():
        sse.large_bodies.on = True
        done.append(sse.json_bytes({"a": 1}))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert done == [b"{}"] and calls == [{"a": 1}]
    assert sse.json_bytes({"a": 1}) == b'{"a":1}'  # (the flag is the worker thread's own)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-32"])
def test_a_large_body_is_decoded_in_pieces_to_the_same_text(encoding):
    text = ("é😀x\ud800" * 700_000)[:2_500_000]
    raw = text.encode(encoding, "surrogatepass")
    assert len(raw) > 4 * base.DECODE_PIECE
    assert base._text(raw, encoding) == raw.decode(encoding, "surrogatepass")


@pytest.mark.parametrize("lone", [b"\\ud800", b"\\udc00", b"\xed\xa0\x80"])
def test_a_lone_surrogate_is_found_wherever_the_searches_are_cut(lone):
    """Bodies over 4 MB are searched a megabyte at a time: a lone surrogate (or an escaped pair)
    astride every cut is still told apart."""
    pair = b"\\ud83d\\ude00"
    filler = pair * (5 * base.DECODE_PIECE // len(pair))
    cut = base.DECODE_PIECE
    for at in range(cut - 14, cut + 14):
        at -= at % len(pair)
        raw = b'{"a": "' + filler[:at] + lone + filler[at:] + b'"}'
        with pytest.raises(GatewayError) as refused:
            base.json_object(raw)
        assert refused.value.code == "invalid_string"
    raw = b'{"a": "' + filler + b'"}'
    assert base.json_object(raw)["a"] == "😀" * (len(filler) // len(pair))
