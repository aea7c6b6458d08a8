"""Every inbound API's request: each place a client's text can be is read and masked in place,
images, base64 sources and the JSON structure are left alone, the re-encoded body is valid JSON,
and a block names the places and detectors without the matched text. A long text found clean is
not scanned again."""

from __future__ import annotations

import json

from addon.guard import places
from addon.guard.config import parse_sets
from addon.guard.scan import guard_body, header_value
from addon.wire.sse import json_bytes
from tests.unit.guard.corpus import AWS_ID, JWT, PEM

SET = parse_sets({"d": {"detect": ["secrets", "private_keys", "credit_cards", "emails"]}})["d"]
CARD = "4111 1111 1111 1111"
IMAGE = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk" + AWS_ID  # base64 that happens to hold one


def masked(api: str, body: dict, mask: bool = True):
    outcome = guard_body(SET.scanner, places.REQUESTS[api](body), mask)
    encoded = json_bytes(body)
    return json.loads(encoded), outcome, encoded


def test_chat_completions_every_place():
    body = {"model": "gpt-4o", "messages": [
        {"role": "system", "content": f"deploy key {AWS_ID}"},
        {"role": "user", "content": [{"type": "text", "text": f"card {CARD}"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64," + IMAGE}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "send", "arguments": json.dumps(
                {"to": "bob@example.com", "note": PEM})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": f"sent with {JWT}"},
    ], "user": "bob@example.com"}
    out, outcome, encoded = masked("openai_chat", body)
    assert out["messages"][0]["content"] == "deploy key [REDACTED:secrets]"
    assert out["messages"][1]["content"][0]["text"] == "card [REDACTED:credit_cards]"
    assert out["messages"][1]["content"][1]["image_url"]["url"].endswith(IMAGE)  # images never read
    args = json.loads(out["messages"][2]["tool_calls"][0]["function"]["arguments"])  # still valid JSON
    assert args == {"to": "[REDACTED:emails]", "note": "[REDACTED:private_keys]"}
    assert out["messages"][3]["content"] == "sent with [REDACTED:secrets]"
    assert out["user"] == "bob@example.com"  # (a field of the request, not a message)
    assert outcome.counts == {"secrets": 2, "credit_cards": 1, "emails": 1, "private_keys": 1}
    assert [w for w, _ in outcome.places] == ["messages[0].content", "messages[1].content[0].text",
                                              "messages[2].tool_calls[0].function.arguments",
                                              "messages[3].content"]
    assert AWS_ID.encode() not in encoded.replace(IMAGE.encode(), b"")
    assert header_value(outcome.counts) == "masked=credit_cards:1,emails:1,private_keys:1,secrets:2"


def test_anthropic_messages_every_place():
    body = {"model": "claude", "max_tokens": 10,
            "system": [{"type": "text", "text": f"key {AWS_ID}"}],
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "mail bob@example.com"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": IMAGE}},
                    {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": f"c {CARD}"}},
                    {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                                    "data": IMAGE}},
                ]},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": f"the key {AWS_ID}", "signature": "sig"},
                    {"type": "tool_use", "id": "t1", "name": "bash", "input": {"command": f"echo {AWS_ID}",
                                                                               "env": [f"K={JWT}"]}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": PEM}]},
                    {"type": "tool_result", "tool_use_id": "t2", "content": f"x {AWS_ID}"}]},
                {"role": "user", "content": f"plain {CARD}"},
            ]}
    out, outcome, _ = masked("anthropic_messages", body)
    assert out["system"][0]["text"] == "key [REDACTED:secrets]"
    user = out["messages"][0]["content"]
    assert user[0]["text"] == "mail [REDACTED:emails]"
    assert user[1]["source"]["data"] == IMAGE and user[3]["source"]["data"] == IMAGE
    assert user[2]["source"]["data"] == "c [REDACTED:credit_cards]"
    assistant = out["messages"][1]["content"]
    assert assistant[0]["thinking"] == f"the key {AWS_ID}"  # signed: a changed one is refused upstream
    assert assistant[1]["input"] == {"command": "echo [REDACTED:secrets]", "env": ["K=[REDACTED:secrets]"]}
    assert out["messages"][2]["content"][0]["content"][0]["text"] == "[REDACTED:private_keys]"
    assert out["messages"][2]["content"][1]["content"] == "x [REDACTED:secrets]"
    assert out["messages"][3]["content"] == "plain [REDACTED:credit_cards]"
    assert ("messages[1].content[1].input.env[0]", ("secrets",)) in outcome.places
    # count_tokens reads the same shape (it is sent to the provider too)
    assert places.REQUESTS["anthropic_count_tokens"] is places.messages_request


def test_responses_every_place():
    body = {"model": "gpt-4o", "instructions": f"use {AWS_ID}", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "to bob@example.com"},
                                     {"type": "input_image", "image_url": "data:image/png;base64," + IMAGE},
                                     {"type": "input_file", "file_data": IMAGE, "filename": "a.pdf"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": json.dumps({"card": CARD})},
        {"type": "function_call_output", "call_id": "c1", "output": f"ok {JWT}"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": f"{AWS_ID}"}]},
        {"type": "reasoning", "encrypted_content": IMAGE},
    ]}
    out, outcome, _ = masked("openai_responses", body)
    assert out["instructions"] == "use [REDACTED:secrets]"
    assert out["input"][0]["content"][0]["text"] == "to [REDACTED:emails]"
    assert out["input"][0]["content"][2]["file_data"] == IMAGE
    assert json.loads(out["input"][1]["arguments"]) == {"card": "[REDACTED:credit_cards]"}
    assert out["input"][2]["output"] == "ok [REDACTED:secrets]"
    assert out["input"][3]["content"][0]["text"] == "[REDACTED:secrets]"
    assert out["input"][4]["encrypted_content"] == IMAGE
    assert masked("openai_responses", {"model": "m", "input": f"k {AWS_ID}"})[0]["input"] == "k [REDACTED:secrets]"


def test_embeddings_input():
    out, outcome, _ = masked("openai_embeddings", {"model": "e", "input": [f"a {AWS_ID}", "b", [1, 2, 3]]})
    assert out["input"] == ["a [REDACTED:secrets]", "b", [1, 2, 3]]
    assert masked("openai_embeddings", {"model": "e", "input": CARD})[0]["input"] == "[REDACTED:credit_cards]"


def test_block_leaves_the_body_and_says_where_without_the_text():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"},
                                       {"role": "user", "content": [{"type": "text", "text": "x"},
                                                                    {"type": "text", "text": f"{CARD} {AWS_ID}"}]}]}
    before = json.dumps(body)
    outcome = guard_body(SET.scanner, places.REQUESTS["openai_chat"](body), mask=False)
    assert json.dumps(body) == before
    assert outcome.places == [("messages[1].content[1].text", ("credit_cards", "secrets"))]
    assert outcome.detectors == ("credit_cards", "secrets")
    assert header_value(outcome.counts, outcome.detectors) == "blocked=credit_cards,secrets"


def test_nothing_found_changes_nothing_and_a_secret_across_texts_is_cut_at_their_border():
    body = {"model": "m", "messages": [{"role": "user", "content": "hello, version 1.2.3 on 2024-01-15"}]}
    outcome = guard_body(SET.scanner, places.REQUESTS["openai_chat"](body), True)
    assert not outcome and outcome.places == []
    body = {"model": "m", "messages": [{"role": "user", "content": "ends with AKIA"},
                                       {"role": "user", "content": "IOSFODNN7EXAMPLE starts this"}]}
    guard_body(SET.scanner, places.REQUESTS["openai_chat"](body), True)  # (two texts: no key across them)
    assert body["messages"][0]["content"] == "ends with AKIA"


def test_a_long_clean_text_is_scanned_once_and_a_text_with_a_match_every_time():
    scanner = parse_sets({"c": {"detect": ["secrets", "emails"]}})["c"].scanner
    calls = []
    spans = scanner.spans
    history = "def f(x):\n    return x * 2\n" * 100  # (2,800 characters, nothing in them)
    leaky = history + f"key = '{AWS_ID}'"

    class Counting:  # the scanner, counting what it is asked to scan
        def __getattr__(self, name):
            return getattr(scanner, name)

        def spans(self, text):
            calls.append(len(text))
            return spans(text)

    counting = Counting()
    for turn in range(3):
        body = {"model": "m", "messages": [{"role": "user", "content": history}, {"role": "user", "content": leaky},
                                           {"role": "user", "content": f"turn {turn}"}]}
        outcome = guard_body(counting, places.REQUESTS["openai_chat"](body), True)
        assert body["messages"][0]["content"] == history and AWS_ID not in body["messages"][1]["content"]
        assert outcome.counts == {"secrets": 1}
    first, *later = calls
    assert first > 2 * len(history) and all(n < len(leaky) + 100 for n in later)  # the history: once
    assert len(scanner.clean) == 1
    changed = history[:-1] + "3"  # as long, one character different: scanned again
    guard_body(counting, places.REQUESTS["openai_chat"]({"messages": [{"role": "user", "content": changed}]}), True)
    assert calls[-1] == len(changed) and len(scanner.clean) == 2
