"""Issue #11, breaks 6 and 11: no request body gets a 500; huge model names and deep nesting get 400.

Property-based (hypothesis), in-process through Gateway.requestheaders + request for each provider
kind (passthrough and translated); bounded to a few hundred examples each (well under 30 s).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy.test import taddons, tflow, tutils

from addon.gateway import Gateway

KEYS = {
    "providers": {"openai": {"base_url": "http://127.0.0.1:9001/v1"}, "anthropic": {"base_url": "http://127.0.0.1:9002"}},
    "virtual_keys": {
        "vk_o": {"provider": "openai", "api_key": "sk-fuzz-openai-000000"},
        "vk_a": {"provider": "anthropic", "api_key": "sk-ant-fuzz-000000"},
    },
}


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "keys.json"
    path.write_text(json.dumps(KEYS))
    addon = Gateway()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, keys_file=str(path))
        yield addon


def send(gw: Gateway, key: str, content: bytes):
    req = tutils.treq(method=b"POST", path=b"/v1/chat/completions", host="127.0.0.1", port=1, scheme=b"http", content=content)
    req.headers.clear()
    req.headers["authorization"] = f"Bearer {key}"
    req.headers["content-type"] = "application/json"
    f = tflow.tflow(req=req)
    gw.requestheaders(f)
    gw.request(f)
    if f.response is None:  # routed: end it as mitmproxy would, so nothing stays in flight
        f.response = tutils.tresp(content=b"{}")
        gw.responseheaders(f)
        gw.response(f)
        return None
    return f.response.status_code, json.loads(f.response.content)["error"]


scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
roles = st.sampled_from(["user", "assistant", "system", "tool", "developer"]) | json_values
parts = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "input_audio", "file"]) | json_values},
                              optional={"text": json_values, "image_url": json_values})
messages = st.lists(st.fixed_dictionaries({"role": roles}, optional={
    "content": st.text(max_size=10) | st.lists(parts | json_values, max_size=3) | json_values,
    "tool_calls": json_values, "tool_call_id": json_values, "name": json_values}), min_size=1, max_size=3)
FIELDS = ["temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "tools", "tool_choice", "n",
          "reasoning_effort", "response_format", "stream_options", "user", "metadata", "seed", "logprobs",
          "parallel_tool_calls", "presence_penalty", "frequency_penalty", "thinking"]
bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["gpt-4o", "claude-sonnet-4-5"]) | json_values, "messages": messages | json_values},
    optional={name: json_values for name in FIELDS} | {"stream": st.booleans() | json_values})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=bodies, key=st.sampled_from(["vk_o", "vk_a"]))
def test_no_chat_body_gets_a_500(gw, body, key):
    result = send(gw, key, json.dumps(body).encode())
    if result is not None:
        status, err = result
        assert status < 500, (status, err, body)
    assert not gw.exchanges


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()), key=st.sampled_from(["vk_o", "vk_a"]))
def test_no_raw_body_gets_a_500(gw, raw, key):
    result = send(gw, key, raw)
    assert result is None or result[0] < 500, (result, raw)


@pytest.mark.parametrize("key", ["vk_o", "vk_a"])
def test_deep_nesting_and_wrong_types_get_400(gw, key):
    status, err = send(gw, key, b'{"model": "gpt-4o", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert status == 400 and err["code"] == "invalid_json"
    for bad in ({"reasoning_effort": []}, {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}):
        result = send(gw, key, json.dumps({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}], **bad}).encode())
        assert result is None or result[0] == 400, result


def test_model_names_over_256_bytes_get_400(gw):
    status, err = send(gw, "vk_o", json.dumps({"model": "m" * 257, "messages": [{"role": "user", "content": "hi"}]}).encode())
    assert (status, err["param"], err["code"]) == (400, "model", "invalid_model")
    assert send(gw, "vk_o", json.dumps({"model": "m" * 256, "messages": [{"role": "user", "content": "hi"}]}).encode()) is None
    assert send(gw, "vk_o", json.dumps({"model": "é" * 129, "messages": [{"role": "user", "content": "hi"}]}).encode())[0] == 400


def test_price_cache_is_bounded_in_bytes(gw):
    from addon.policy.keys import MODEL_ANSWERS_BYTES
    store = gw.keys
    for i in range(20_000):
        store.price(f"{i:08d}" + "x" * 240)
    assert store._price_bytes <= MODEL_ANSWERS_BYTES
    assert sum(map(len, store._price_of)) <= MODEL_ANSWERS_BYTES
