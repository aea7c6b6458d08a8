"""Duplicate JSON keys and caps on message and part counts, through a real gateway process: the fake
provider receives nothing, the client gets a 400 in its own API's error shape."""

from __future__ import annotations

import http.client
import json

import pytest

from addon.apis.base import MAX_MESSAGES, MAX_PARTS
from tests.fakeprovider import Reply, openai_completion

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gateway(provider_server, gateway_factory):
    return gateway_factory({
        "providers": {"openai": {"base_url": provider_server.url + "/v1"},
                      "anthropic": {"base_url": provider_server.url + "/v1"}},
        "virtual_keys": {"vk_checks_o": {"provider": "openai", "api_key": "sk-checks-openai-000001"},
                         "vk_checks_a": {"provider": "anthropic", "api_key": "sk-ant-checks-000001"}},
    })


def post(gateway, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    try:
        conn.request("POST", path, body, {"content-type": "application/json", **headers})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def chat(gateway, body: bytes):
    return post(gateway, "/v1/chat/completions", body, {"authorization": "Bearer vk_checks_o"})


def messages(gateway, body: bytes):
    return post(gateway, "/v1/messages", body, {"x-api-key": "vk_checks_a", "anthropic-version": "2023-06-01"})


ANTHROPIC_REPLY = {"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-6",
                   "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn", "stop_sequence": None,
                   "usage": {"input_tokens": 3, "output_tokens": 1}}

DUPLICATES = [
    (b'{"model": "gpt-4o", "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    (b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi", "role": "system"}]}', "role"),
    (b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "max_tokens": 9}',
     "max_tokens"),
]


@pytest.mark.parametrize("raw, key", DUPLICATES)
def test_a_repeated_json_key_gets_400_and_is_not_forwarded(gateway, provider, raw, key):
    status, body = chat(gateway, raw)
    assert status == 400
    assert body["error"]["code"] == "duplicate_key" and body["error"]["param"] == key
    assert f'"{key}"' in body["error"]["message"]
    status, body = messages(gateway, raw.replace(b"gpt-4o-mini", b"claude-sonnet-4-6"))
    assert status == 400
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert f'"{key}"' in body["error"]["message"]
    assert provider.received == []


def test_the_same_key_in_different_objects_is_forwarded_unchanged(gateway, provider):
    raw = (b'{"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "be brief"},'
           b' {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}')
    status, body = chat(gateway, raw)
    assert status == 200, body
    [got] = provider.received
    assert got.body == raw


def conversation(count: int, parts: int = 0) -> list[dict]:
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "x"} for i in range(count)]
    if parts:
        turns[-1] = {"role": "user", "content": [{"type": "text", "text": "p"}] * parts}
    return turns


@pytest.mark.parametrize("send, model", [(chat, "gpt-4o-mini"), (messages, "claude-sonnet-4-6")])
@pytest.mark.parametrize("turns, parts, param, code", [
    (MAX_MESSAGES + 1, 0, "messages", "too_many_messages"),
    (3, MAX_PARTS + 1, "messages[2].content", "too_many_parts"),
])
def test_message_and_part_counts_over_the_caps_get_400(gateway, provider, send, model, turns, parts, param, code):
    raw = json.dumps({"model": model, "max_tokens": 8, "messages": conversation(turns, parts)}).encode()
    status, body = send(gateway, raw)
    assert status == 400
    assert param in body["error"]["message"]
    if send is chat:
        assert body["error"]["param"] == param and body["error"]["code"] == code
    else:
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert provider.received == []


@pytest.mark.parametrize("send, model", [(chat, "gpt-4o-mini"), (messages, "claude-sonnet-4-6")])
def test_message_and_part_counts_at_the_caps_are_forwarded(gateway, provider, send, model):
    provider.reset(handler=lambda req: Reply.json(
        ANTHROPIC_REPLY if req.path.endswith("/messages") else openai_completion(req.json())))
    turns = conversation(MAX_MESSAGES - 1) + conversation(1, MAX_PARTS)
    status, body = send(gateway, json.dumps({"model": model, "max_tokens": 8, "messages": turns}).encode())
    assert status == 200, body
    [got] = provider.received
    sent = got.json()["messages"]
    assert len(sent) == MAX_MESSAGES and len(sent[-1]["content"]) == MAX_PARTS




