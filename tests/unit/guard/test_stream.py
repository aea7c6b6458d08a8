"""Streamed answers masked as they pass, in each API's events: a secret split at every offset
inside it is caught, what reaches the client equals the whole answer masked, the events stay
valid (Responses sequence numbers still count up by one), and nothing but the end that could
still be the start of a match is held back."""

from __future__ import annotations

import json

import pytest

from addon.guard.config import parse_sets
from addon.guard.stream import StreamGuard, TextMasker, mask_answer
from addon.wire.sse import SSEDecoder
from tests.unit.guard.corpus import AWS_ID, JWT

SET = parse_sets({"d": {"detect": ["secrets", "private_keys", "credit_cards", "iban", "phones", "emails"]}})["d"]
S = SET.scanner
CARD = "4111 1111 1111 1111"
TEXT = f"Use {AWS_ID} and mail bob@example.com, card {CARD}; token {JWT} done."
SECRETS = (AWS_ID, "bob@example.com", CARD, JWT)
WHOLE = S.mask(TEXT)


def sse(event, obj) -> bytes:
    head = f"event: {event}\n" if event else ""
    return (head + "data: " + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n\n").encode()


def chat_stream(pieces, tool=False):
    out = [sse(None, {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                      "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})]
    if tool:
        out.append(sse(None, {"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}]},
            "finish_reason": None}]}))
    for p in pieces:
        delta = {"tool_calls": [{"index": 0, "function": {"arguments": p}}]} if tool else {"content": p}
        out.append(sse(None, {"id": "c1", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}))
    out.append(sse(None, {"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    out.append(sse(None, "[DONE]"))
    return out


def chat_text(events, tool=False):
    text = ""
    for _, data in events:
        if data == "[DONE]":
            continue
        for choice in json.loads(data)["choices"]:
            delta = choice["delta"]
            if tool:
                for call in delta.get("tool_calls") or []:
                    text += call["function"].get("arguments", "")
            else:
                text += delta.get("content") or ""
    return text


def messages_stream(pieces, tool=False):
    block = {"type": "tool_use", "id": "t", "name": "f", "input": {}} if tool else {"type": "text", "text": ""}
    kind, field = ("input_json_delta", "partial_json") if tool else ("text_delta", "text")
    out = [sse("message_start", {"type": "message_start", "message": {"id": "m", "content": []}}),
           sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})]
    out += [sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": kind, field: p}})
            for p in pieces]
    out += [sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
            sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}),
            sse("message_stop", {"type": "message_stop"})]
    return out


def messages_text(events, tool=False):
    text, stopped = "", False
    for event, data in events:
        obj = json.loads(data)
        if obj["type"] == "content_block_stop":
            stopped = True
        if obj["type"] == "content_block_delta":
            assert not stopped, "a delta after its block stopped"
            text += obj["delta"]["partial_json" if tool else "text"]
    return text


def responses_stream(pieces, tool=False):
    whole = "".join(pieces)
    n = iter(range(100000))
    kind = "response.function_call_arguments" if tool else "response.output_text"
    item = ({"type": "function_call", "id": "fc", "call_id": "c", "name": "f", "arguments": whole} if tool else
            {"type": "message", "id": "msg", "role": "assistant",
             "content": [{"type": "output_text", "text": whole, "annotations": []}]})
    out = [sse("response.created", {"type": "response.created", "sequence_number": next(n), "response": {}})]
    for p in pieces:
        ev = {"type": kind + ".delta", "sequence_number": next(n), "item_id": "i", "output_index": 0, "delta": p}
        if not tool:
            ev["content_index"] = 0
        out.append(sse(kind + ".delta", ev))
    done = {"type": kind + ".done", "sequence_number": next(n), "item_id": "i", "output_index": 0}
    done["arguments" if tool else "text"] = whole
    if not tool:
        done["content_index"] = 0
    out.append(sse(kind + ".done", done))
    if not tool:
        out.append(sse("response.content_part.done", {"type": "response.content_part.done", "sequence_number": next(n),
                                                      "part": {"type": "output_text", "text": whole}}))
    out.append(sse("response.output_item.done", {"type": "response.output_item.done", "sequence_number": next(n),
                                                 "output_index": 0, "item": item}))
    out.append(sse("response.completed", {"type": "response.completed", "sequence_number": next(n),
                                          "response": {"output": [item]}}))
    return out


def responses_text(events, tool=False):
    text, numbers, finals = "", [], []
    for event, data in events:
        obj = json.loads(data)
        numbers.append(obj["sequence_number"])
        if obj["type"].endswith(".delta"):
            text += obj["delta"]
        elif obj["type"].endswith(".done") and ("text" in obj or "arguments" in obj):
            finals.append(obj.get("text", obj.get("arguments")))
        elif obj["type"] == "response.completed":
            item = obj["response"]["output"][0]
            finals.append(item["arguments"] if tool else item["content"][0]["text"])
    assert numbers == list(range(len(numbers))), numbers  # still one by one after events were added
    assert all(f == text for f in finals), (finals, text)  # the whole texts say what the deltas said
    return text


APIS = {
    "openai_chat": (chat_stream, chat_text),
    "anthropic_messages": (messages_stream, messages_text),
    "openai_responses": (responses_stream, responses_text),
}


def run(api, pieces, tool=False, split=None):
    build, read = APIS[api]
    raw = b"".join(build(pieces, tool))
    guard = StreamGuard(api, S)
    out = b""
    step = split or len(raw)
    for i in range(0, len(raw), step):  # the bytes too arrive in pieces, cut anywhere
        out += guard.feed(raw[i:i + step])
    out += guard.end()
    decoder = SSEDecoder()
    events = decoder.feed(out) + decoder.flush()
    return out, read(events, tool), guard


@pytest.mark.parametrize("api", list(APIS))
@pytest.mark.parametrize("tool", [False, True], ids=["text", "tool_arguments"])
def test_a_secret_split_at_every_offset_is_caught(api, tool):
    text = json.dumps({"note": TEXT}) if tool else TEXT
    whole = S.mask(text)
    for secret in SECRETS:
        at = text.index(secret)
        for offset in range(1, len(secret)):
            cut = at + offset
            out, seen, _ = run(api, [text[:cut], text[cut:]], tool)
            assert seen == whole, (secret, offset)
            for s in SECRETS:
                assert s.encode() not in out


@pytest.mark.parametrize("api", list(APIS))
def test_chunks_of_every_size_and_bytes_cut_anywhere(api):
    for size in (1, 2, 3, 5, 7, 16, 64):
        pieces = [TEXT[i:i + size] for i in range(0, len(TEXT), size)]
        out, seen, guard = run(api, pieces, split=size * 13 + 1)
        assert seen == WHOLE, size
        assert not any(s.encode() in out for s in SECRETS)
        assert guard.counts == {"secrets": 2, "emails": 1, "credit_cards": 1}, size


def test_whole_answers():
    counts: dict[str, int] = {}
    chat = {"choices": [{"index": 0, "message": {"role": "assistant", "content": TEXT, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": json.dumps({"k": AWS_ID})}}]}}]}
    assert mask_answer("openai_chat", chat, S, counts)
    assert chat["choices"][0]["message"]["content"] == WHOLE
    assert json.loads(chat["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]) == {
        "k": "[REDACTED:secrets]"}
    msg = {"content": [{"type": "text", "text": TEXT}, {"type": "tool_use", "input": {"k": [AWS_ID]}}]}
    assert mask_answer("anthropic_messages", msg, S, counts)
    assert msg["content"][0]["text"] == WHOLE and msg["content"][1]["input"] == {"k": ["[REDACTED:secrets]"]}
    resp = {"output": [{"type": "message", "content": [{"type": "output_text", "text": TEXT}]}]}
    assert mask_answer("openai_responses", resp, S, counts)
    assert resp["output"][0]["content"][0]["text"] == WHOLE
    assert not mask_answer("openai_chat", {"choices": [{"message": {"content": "fine"}}]}, S, counts)


def test_held_back_is_only_what_could_still_be_a_match():
    """Plain prose is released at once but for its last word (an address's local part could
    follow): each chunk waits at most for the next one."""
    m = TextMasker(S, {})
    assert m.feed("The answer is ") == "The answer is "
    assert m.feed("forty") == ""  # the start of a word: could still be bob@example.com
    assert m.feed(" two. ") == "forty two. "
    assert m.feed("Key: AKIA") == "Key: "
    assert m.feed("IOSFODNN7EXAMPLE") == ""  # whole, but could still grow
    assert m.feed(" ok") == "[REDACTED:secrets] "
    assert m.flush() == "ok"


def test_a_held_tail_is_bounded_by_the_detectors():
    """A run that no detector could still be matching is released even mid-word."""
    only_cards = parse_sets({"c": {"detect": ["credit_cards"]}})["c"].scanner
    m = TextMasker(only_cards, {})
    assert m.feed("word") == "word"
    assert m.feed(" 4111 1111") == " "
    assert m.feed(" 1111 1111 and more") == "[REDACTED:credit_cards] and more"


def test_apis_without_streams_pass_through():
    guard = StreamGuard("openai_embeddings", S)
    assert guard.feed(b"data: x\n\n") == b"data: x\n\n" and guard.end() == b""
