"""Issue #11, break 12 (duplicate JSON keys) and break 5 (caps on message and part counts),
through a real gateway process: the fake provider receives nothing, the client gets a 400 in its
own API's error shape."""

from __future__ import annotations

import http.client
import json

import pytest

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
    status, body = messages(gateway, raw.replace(b"gpt-4o-mini", b"claude-sonnet-4-5"))
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
