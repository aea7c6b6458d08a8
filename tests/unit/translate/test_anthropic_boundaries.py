"""Chunk boundaries: however the network splits an Anthropic stream, the client gets the same bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from addon.translate.openai_chat_anthropic_response import StreamTranslator
from tests.conftest import SHARED_REFERENCE

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "anthropic_text_tools_stream.sse"
RECORDED = sorted((SHARED_REFERENCE / "recorded" / "anthropic").glob("*.sse")) if SHARED_REFERENCE.exists() else []


def translate(pieces: list[bytes], include_usage: bool = True) -> bytes:
    translator = StreamTranslator(1700000000, "claude", include_usage)
    out = bytearray()
    for piece in pieces:
        result = translator(piece)
        assert result != b"", "b'' for a data piece would end the client's chunked body"
        out += b"".join(result)
    out += b"".join(translator(b""))
    return bytes(out)


def assert_same_at_every_split(raw: bytes) -> bytes:
    whole = translate([raw])
    for offset in range(1, len(raw)):
        assert translate([raw[:offset], raw[offset:]]) == whole, f"split at byte {offset}"
    assert translate([raw[i:i + 1] for i in range(len(raw))]) == whole, "single bytes"
    return whole


def client_events(out: bytes) -> list:
    frames = out.decode().split("\n\n")
    assert frames[-1] == ""
    return [f[6:] if f == "data: [DONE]" else json.loads(f[6:]) for f in frames[:-1]]


@pytest.mark.parametrize("line_ending", [b"\n", b"\r\n"])
def test_project_fixture_same_output_at_every_split(line_ending):
    raw = FIXTURE.read_bytes().replace(b"\n", line_ending)
    events = client_events(assert_same_at_every_split(raw))
    # and the output is the right one, not merely a stable one
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    assert text == "Je vérifie la météo à Zürich et à 東京 ☀️ pour vous."
    calls: dict[int, dict] = {}
    for e in events[:-1]:
        for call in (e["choices"][0]["delta"].get("tool_calls") or []) if e["choices"] else []:
            entry = calls.setdefault(
                call["index"], {"id": call.get("id"), "name": call.get("function", {}).get("name"), "arguments": ""}
            )
            entry["arguments"] += call["function"]["arguments"]
    assert calls == {
        0: {"id": "toolu_01Fixture1", "name": "get_weather", "arguments": '{"city": "Zürich", "unit": "c"}'},
        1: {"id": "toolu_01Fixture2", "name": "get_weather", "arguments": '{"city": "東京"}'},
    }
    assert events[-3]["choices"][0]["finish_reason"] == "tool_calls"
    assert events[-2]["usage"]["prompt_tokens"] == 668 and events[-2]["usage"]["completion_tokens"] == 87
    assert events[-1] == "[DONE]"
    assert {e["id"] for e in events[:-1]} == {"msg_01FixtureBoundary"}


@pytest.mark.skipif(not RECORDED, reason="shared reference recordings absent")
@pytest.mark.parametrize("path", RECORDED, ids=lambda p: p.name)
def test_recorded_streams_same_output_at_every_split(path):
    events = client_events(assert_same_at_every_split(path.read_bytes()))
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1] == "[DONE]"
    assert sum(1 for e in events[:-1] if e["choices"] and e["choices"][0]["finish_reason"]) == 1


def test_each_event_goes_out_as_soon_as_it_is_complete():
    raw = FIXTURE.read_bytes()
    translator = StreamTranslator(1, "claude", False)
    first_event_end = raw.index(b"\n\n") + 2
    assert translator(raw[:first_event_end - 1]) == []  # incomplete: held back
    out = translator(raw[first_event_end - 1:first_event_end])
    assert len(out) == 1 and b'"role":"assistant"' in out[0]
