"""No request body gets a 500; huge model names and deep nesting get 400; a string with an
unpaired surrogate, in any field of any API, is a 400 in the client's shape.

Property-based (hypothesis), in-process through Gateway.requestheaders + request for each provider
kind (passthrough and translated); bounded to a few hundred examples each (well under 30 s). The
same tests run against RedisStore in tests/e2e/test_fuzz_redis.py (fixtures `gw` and `mgw` there).
"""

from __future__ import annotations

import contextlib
import json
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from mitmproxy import flow
from mitmproxy.test import taddons, tflow, tutils

from addon.hooks.gateway import Gateway
from tests.conftest import examples

KEYS = {
    "providers": {"openai": {"base_url": "http://127.0.0.1:9001/v1"}, "anthropic": {"base_url": "http://127.0.0.1:9002"}},
    "virtual_keys": {
        "vk_o": {"provider": "openai", "api_key": "sk-fuzz-openai-000000"},
        "vk_a": {"provider": "anthropic", "api_key": "sk-ant-fuzz-000000"},
        # limits far out of reach: the store is asked (reserve, settle) for every request
        "vk_l": {"provider": "openai", "api_key": "sk-fuzz-limited-000000", "rpm": 10**9, "tpm": 10**15,
                 "budget_tokens": 10**15, "max_parallel": 10**6},
    },
}
RECORDED = {"vk_o": "resp_fuzz0001", "vk_l": "resp_fuzz0002"}  # a stored response each created (owner records)


@contextlib.contextmanager
def gateway_with(keys: dict, directory):
    """A Gateway addon with `keys` loaded, in a mitmproxy test context."""
    path = directory / "keys.json"
    path.write_text(json.dumps(keys))
    addon = Gateway()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, keys_file=str(path))
        yield addon


def record_owners(addon: Gateway) -> None:
    for name, resource_id in RECORDED.items():
        assert addon.live.store.note_owner(resource_id, addon.live.keys.lookup(name).fingerprint, time.time()) is None


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    with gateway_with(KEYS, tmp_path_factory.mktemp("fuzz")) as addon:
        record_owners(addon)
        yield addon


def finish(gw: Gateway, pending) -> None:
    """MemoryStore answers at once (nothing pending); a store that does I/O gives an awaitable,
    which `gw.run_pending` (tests/e2e/test_fuzz_redis.py) runs to its end with the store's sends."""
    run = getattr(gw, "run_pending", None)
    if run is None:
        assert pending is None  # MemoryStore: nothing to wait for
    else:
        run(pending)


def strict_json(raw: bytes):
    """What a provider's JSON parser accepts: UTF-8, no NaN or Infinity."""
    def refuse(name):
        raise AssertionError(f"{name} forwarded")
    return json.loads(raw.decode("utf-8"), parse_constant=refuse)


# where each key's chat requests go: (host, port, path), and the header carrying its provider key
CHAT_ROUTED_TO = {"vk_o": (("127.0.0.1", 9001, "/v1/chat/completions"), "authorization"),
                  "vk_a": (("127.0.0.1", 9002, "/messages"), "x-api-key"),
                  "vk_l": (("127.0.0.1", 9001, "/v1/chat/completions"), "authorization")}


def send(gw: Gateway, key: str, content: bytes, path: bytes = b"/v1/chat/completions"):
    """An OpenAI-API request (chat unless `path` says). Answered by the gateway: (status, error),
    nothing pointed anywhere. Routed: checks it goes only where the key goes, with the provider's
    key header (a placeholder on the flow) and nothing of the client's key, carrying what the
    client asked for; returns None."""
    req = tutils.treq(method=b"POST", path=path, host="127.0.0.1", port=1, scheme=b"http", content=content)
    req.headers.clear()
    req.headers["authorization"] = f"Bearer {key}"
    req.headers["content-type"] = "application/json"
    f = tflow.tflow(req=req)
    gw.requestheaders(f)
    finish(gw, gw.request(f))
    if f.response is not None:
        assert (f.request.host, f.request.port) == ("127.0.0.1", 1)  # nothing pointed anywhere
        assert f.response.headers["x-gateway-error-source"] == "gateway"
        error = json.loads(f.response.content)["error"]
        assert isinstance(error["message"], str) and isinstance(error["type"], str), error
        return f.response.status_code, error
    (host, port, upstream), secret = CHAT_ROUTED_TO[key]
    if path != b"/v1/chat/completions":  # Responses, embeddings: OpenAI keys only, passed through
        upstream = path.decode()
    assert (f.request.host, f.request.port, f.request.path) == (host, port, upstream)
    assert key not in str(f.request.headers), f.request.headers
    assert f.request.headers[secret].endswith(f"REDACTED.{f.id}")
    assert len(f.request.headers.get_all(secret)) == 1
    sent, client = strict_json(f.request.content), json.loads(content)
    assert isinstance(sent, dict) and sent["model"] == client["model"]
    if key != "vk_a":  # passthrough: what the client sent, a usage request at most added to a stream
        assert {k: v for k, v in sent.items() if k != "stream_options"} == \
            {k: v for k, v in client.items() if k != "stream_options"}
    else:  # translated to Messages: turns, each with a role, and the max_tokens Anthropic requires
        assert isinstance(sent["messages"], list) and all(isinstance(m, dict) and "role" in m for m in sent["messages"])
        assert isinstance(sent["max_tokens"], int) and sent["max_tokens"] > 0
    # end it as mitmproxy would, so nothing stays in flight
    f.response = tutils.tresp(content=b"{}")
    gw.responseheaders(f)
    gw.response(f)
    finish(gw, None)
    return None


def lone_surrogate(value) -> bool:
    """Whether a value (as the test built it) holds a string or key with an unpaired surrogate."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_refusal(body, result) -> None:
    """A body with an unpaired surrogate anywhere is never routed: a 400 (the one that names it,
    or one for what else was wrong first: an Infinity, an endpoint the key's provider lacks);
    any other is not a 500."""
    if lone_surrogate(body):
        assert result is not None and result[0] == 400, (result, body)
    elif result is not None:
        assert result[0] < 500, (result, body)


# now and then an unpaired surrogate: JSON's "\\ud800" escape parses to one
lone = st.sampled_from(["a\ud800b", "\udfff", "\ud83d", "x\udc00"])
strings = st.text(max_size=20) | lone
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | strings
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | lone, inner, max_size=4),
    max_leaves=20,
)
roles = st.sampled_from(["user", "assistant", "system", "tool", "developer"]) | json_values
parts = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "input_audio", "file"]) | json_values},
                              optional={"text": json_values, "image_url": json_values})
messages = st.lists(st.fixed_dictionaries({"role": roles}, optional={
    "content": st.text(max_size=10) | lone | st.lists(parts | json_values, max_size=3) | json_values,
    "tool_calls": json_values, "tool_call_id": json_values, "name": json_values}), min_size=1, max_size=3)
FIELDS = ["temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "tools", "tool_choice", "n",
          "reasoning_effort", "response_format", "stream_options", "user", "metadata", "seed", "logprobs",
          "parallel_tool_calls", "presence_penalty", "frequency_penalty", "thinking"]
bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["gpt-4o", "claude-sonnet-4-6"]) | json_values, "messages": messages | json_values},
    optional={name: json_values for name in FIELDS} | {"stream": st.booleans() | json_values})


@settings(
    max_examples=examples(150),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=bodies, key=st.sampled_from(["vk_o", "vk_a", "vk_l"]))
# drawn bodies are rarely well-formed enough to be routed: these are, so every run checks where
# a routed request goes and what it carries, for each kind of provider
@example(body={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True}, key="vk_o")
@example(
    body={
        "model": "claude-sonnet-4-6",
        "max_tokens": 5,
        "stream": True,
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    },
    key="vk_a",
)
def test_no_chat_body_gets_a_500(gw, body, key):
    check_refusal(body, send(gw, key, json.dumps(body).encode()))
    assert not gw.live.in_flight


# the Responses API: the stored objects a request names (previous_response_id, conversation) are
# looked up in the store (policy/owners.py), before anything is forwarded
stored_ids = st.sampled_from([*RECORDED.values(), "resp_unknown", "conv_1"]) | strings | json_values
responses_bodies = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["gpt-4o", "o3"]) | json_values,
        "input": st.text(max_size=10)
        | lone
        | st.lists(st.fixed_dictionaries({"role": roles, "content": strings | json_values}), max_size=2),
    },
    optional={
        "previous_response_id": stored_ids,
        "conversation": stored_ids | st.fixed_dictionaries({"id": stored_ids}),
        "instructions": strings,
        "store": json_values,
        "stream": st.booleans() | json_values,
        "metadata": json_values,
        "tools": json_values,
        "max_output_tokens": json_values,
        "background": json_values,
    },
)


@settings(
    max_examples=examples(150),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=responses_bodies, key=st.sampled_from(["vk_o", "vk_l"]))
# a continuation of each key's own recorded response is routed: every run checks where it goes
@example(body={"model": "gpt-4o", "input": "hi", "previous_response_id": RECORDED["vk_o"]}, key="vk_o")
@example(body={"model": "gpt-4o", "input": "hi", "previous_response_id": RECORDED["vk_l"]}, key="vk_l")
def test_no_responses_body_gets_a_500(gw, body, key):
    check_refusal(body, send(gw, key, json.dumps(body).encode(), b"/v1/responses"))
    assert not gw.live.in_flight


@settings(
    max_examples=examples(60),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=st.fixed_dictionaries({"model": st.just("text-embedding-3-small") | json_values,
                                   "input": strings | st.lists(strings, min_size=1, max_size=3) | json_values},
                                  optional={"dimensions": json_values, "user": strings}),
       key=st.sampled_from(["vk_o", "vk_l"]))
@example(body={"model": "text-embedding-3-small", "input": ["hi"]}, key="vk_l")
def test_no_embeddings_body_gets_a_500(gw, body, key):
    check_refusal(body, send(gw, key, json.dumps(body).encode(), b"/v1/embeddings"))
    assert not gw.live.in_flight


@settings(
    max_examples=examples(100),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    raw=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()),
    key=st.sampled_from(["vk_o", "vk_a", "vk_l"]),
)
@example(raw=b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}', key="vk_o")
@example(raw=b'{"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "hi"}]}', key="vk_a")
def test_no_raw_body_gets_a_500(gw, raw, key):
    result = send(gw, key, raw)
    assert result is None or result[0] < 500, (result, raw)


@pytest.mark.parametrize("key", ["vk_o", "vk_a"])
def test_deep_nesting_and_wrong_types_get_400(gw, key):
    status, err = send(gw, key, b'{"model": "gpt-4o", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert status == 400 and err["code"] == "invalid_json"
    for bad in ({"reasoning_effort": []}, {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}):
        result = send(
            gw,
            key,
            json.dumps({"model": "claude-sonnet-4-6", "messages": [{"role": "user", "content": "hi"}], **bad}).encode(),
        )
        assert result is None or result[0] == 400, result


def test_model_names_over_256_bytes_get_400(gw):
    status, err = send(
        gw, "vk_o", json.dumps({"model": "m" * 257, "messages": [{"role": "user", "content": "hi"}]}).encode()
    )
    assert (status, err["param"], err["code"]) == (400, "model", "invalid_model")
    assert (
        send(gw, "vk_o", json.dumps({"model": "m" * 256, "messages": [{"role": "user", "content": "hi"}]}).encode())
        is None
    )
    assert (
        send(gw, "vk_o", json.dumps({"model": "é" * 129, "messages": [{"role": "user", "content": "hi"}]}).encode())[0]
        == 400
    )


def test_price_cache_is_bounded_in_bytes(gw):
    from addon.policy.virtual_keys import MODEL_ANSWERS_BYTES
    store = gw.live.keys
    for i in range(20_000):
        store.price(f"{i:08d}" + "x" * 240)
    assert store._price_bytes <= MODEL_ANSWERS_BYTES
    assert sum(map(len, store._price_of)) <= MODEL_ANSWERS_BYTES


# --- Anthropic Messages (/v1/messages): the same promise, in Anthropic's error shape -------------------

MESSAGES_KEYS = {
    "providers": {"openai": {"base_url": "http://127.0.0.1:9001/v1"}, "anthropic": {"base_url": "http://127.0.0.1:9002/v1"},
                  "deepseek": {"base_url": "http://127.0.0.1:9003"}},
    "prices": {"*": {"input": 1.0, "output": 2.0}},
    "virtual_keys": {
        "vk_m_openai": {"provider": "openai", "api_key": "sk-fuzz-m-openai-0001"},
        "vk_m_anthropic": {"provider": "anthropic", "api_key": "sk-ant-fuzz-m-0002"},
        # limits far out of reach: the worst-case estimate runs over every body, and admits it
        "vk_m_limited": {"provider": "deepseek", "api_key": "sk-fuzz-m-deepseek-0003", "tpm": 10**15,
                         "budget_tokens": 10**15, "budget_usd": 10.0**12},
    },
}
# where each key's requests may go: (host, port, path), and the header carrying its provider key
ROUTED_TO = {"vk_m_openai": (("127.0.0.1", 9001, "/v1/chat/completions"), "authorization"),
             "vk_m_anthropic": (("127.0.0.1", 9002, "/v1/messages"), "x-api-key"),
             "vk_m_limited": (("127.0.0.1", 9003, "/chat/completions"), "authorization")}


@pytest.fixture(scope="module")
def mgw(tmp_path_factory):
    with gateway_with(MESSAGES_KEYS, tmp_path_factory.mktemp("fuzz-messages")) as addon:
        yield addon


def send_messages(gw: Gateway, key: str, content: bytes, path: bytes = b"/v1/messages"):
    """A Messages request as the anthropic SDK sends it. Routed: checks what would be forwarded,
    returns None. Answered: (status, body), the body asserted Anthropic-shaped."""
    req = tutils.treq(method=b"POST", path=path, host="127.0.0.1", port=1, scheme=b"http", content=content)
    req.headers.clear()
    req.headers["x-api-key"] = key
    req.headers["anthropic-version"] = "2023-06-01"
    req.headers["content-type"] = "application/json"
    req.headers["content-length"] = str(len(content))
    f = tflow.tflow(req=req)
    gw.requestheaders(f)
    finish(gw, gw.request(f))
    if f.response is not None:
        assert (f.request.host, f.request.port) == ("127.0.0.1", 1)  # nothing pointed anywhere
        body = json.loads(f.response.content)
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
        assert isinstance(body["error"]["type"], str) and isinstance(body["error"]["message"], str)
        assert f.response.headers["x-gateway-error-source"] == "gateway"
        # a field the pair cannot take is named, not met with the catch-all
        assert body["error"]["message"] != "a request field has a type or value the gateway cannot translate", content
        return f.response.status_code, body
    # routed: only where this key goes, with the provider's key header (a placeholder on the flow)
    # and nothing of the client's key; the body is what the pair made of a request it accepted
    (host, port, upstream_path), secret = ROUTED_TO[key]
    assert (f.request.host, f.request.port, f.request.path.partition("?")[0]) == (
        host,
        port,
        path.decode().replace("/v1/messages", upstream_path, 1),
    )
    assert key not in str(f.request.headers), f.request.headers
    assert f.request.headers[secret].endswith(f"REDACTED.{f.id}")
    assert len(f.request.headers.get_all(secret)) == 1
    sent = strict_json(f.request.content)
    client = json.loads(content)
    assert isinstance(sent, dict) and sent["model"] == client["model"]
    if key == "vk_m_anthropic":
        assert f.request.content == content  # passthrough: the client's bytes, unchanged
    else:
        assert isinstance(sent["messages"], list) and all(isinstance(m, dict) and "role" in m for m in sent["messages"])
    assert f.request.headers["content-length"] == str(len(f.request.content))
    f.error = flow.Error("connection refused")  # ended as mitmproxy would: nothing stays in flight
    gw.error(f)
    finish(gw, None)
    return None


def mostly(valid, junk=json_values):
    """Usually a well-formed value, sometimes anything: reaches past the first check."""
    return st.integers(0, 9).flatmap(lambda i: junk if i == 9 else valid)


text = st.text(max_size=12) | lone
ids = st.sampled_from(["toolu_1", "call_2"]) | text
text_block = st.fixed_dictionaries(
    {"type": st.just("text"), "text": mostly(text)}, optional={"cache_control": json_values}
)
image_block = st.fixed_dictionaries({"type": st.just("image"), "source": mostly(st.one_of(
    st.fixed_dictionaries({"type": st.just("base64"), "media_type": mostly(st.just("image/png")),
                           "data": mostly(st.sampled_from(["aGk=", "!!", ""]))}),
    st.fixed_dictionaries({"type": st.just("url"), "url": mostly(text)}),
    st.fixed_dictionaries({"type": st.just("file"), "file_id": text})))})
tool_use_block = st.fixed_dictionaries({"type": st.just("tool_use"), "id": mostly(ids), "name": mostly(text),
                                        "input": mostly(st.dictionaries(text, json_values, max_size=2))})
tool_result_block = st.fixed_dictionaries({"type": st.just("tool_result"), "tool_use_id": mostly(ids)}, optional={
    "content": mostly(text | st.lists(text_block | image_block, max_size=2)), "is_error": json_values})
thinking_block = st.fixed_dictionaries({"type": st.sampled_from(["thinking", "redacted_thinking"]),
                                        "thinking": text, "signature": text, "data": text})
other_block = st.fixed_dictionaries({"type": st.sampled_from(["document", "server_tool_use", "search_result",
                                                              "web_search_tool_result"]) | json_values})
blocks = st.one_of(text_block, image_block, tool_use_block, tool_result_block, thinking_block, other_block, json_values)
turns = st.lists(st.fixed_dictionaries(
    {"role": mostly(st.sampled_from(["user", "assistant"]), st.sampled_from(["system", "tool"]) | json_values),
     "content": mostly(text | st.lists(blocks, min_size=1, max_size=3))}), min_size=1, max_size=3)
tool_defs = st.lists(
    mostly(
        st.fixed_dictionaries(
            {"name": mostly(text)},
            optional={
                "type": st.sampled_from(["custom", "web_search_20250305", "bash_20250124"]) | json_values,
                "description": mostly(text),
                "cache_control": json_values,
                "input_schema": mostly(st.just({"type": "object", "properties": {"x": {"type": "string"}}})),
            },
        )
    ),
    min_size=1,
    max_size=2,
)
MESSAGES_FIELDS = {
    "system": mostly(text | st.lists(text_block, max_size=2)),
    "stop_sequences": mostly(st.lists(text, max_size=2)),
    "temperature": mostly(st.floats(0, 2)),
    "top_p": mostly(st.floats(0, 1)),
    "top_k": mostly(st.integers(1, 50)),
    "metadata": mostly(st.fixed_dictionaries({}, optional={"user_id": mostly(text), "x": json_values})),
    "tools": mostly(tool_defs),
    "tool_choice": mostly(
        st.fixed_dictionaries(
            {"type": mostly(st.sampled_from(["auto", "any", "tool", "none"]))},
            optional={"name": mostly(text), "disable_parallel_tool_use": json_values},
        )
    ),
    "thinking": mostly(
        st.fixed_dictionaries(
            {"type": mostly(st.sampled_from(["enabled", "disabled", "adaptive"]))},
            optional={"budget_tokens": mostly(st.integers(0, 10**6))},
        )
    ),
    "output_config": mostly(
        st.fixed_dictionaries(
            {}, optional={"effort": mostly(st.sampled_from(["low", "high", "max"])), "format": json_values}
        )
    ),
    "service_tier": json_values,
    "context_management": json_values,
    "mcp_servers": json_values,
    "container": json_values,
    "stream": mostly(st.booleans()),
    "anything_new": json_values,
}
messages_bodies = st.fixed_dictionaries(
    {"model": mostly(st.sampled_from(["claude-sonnet-4-6", "gpt-5", "deepseek-reasoner", "o3", "gpt-4o"])),
     "max_tokens": mostly(st.integers(1, 10**6), st.integers(-2, 0) | json_values),
     "messages": mostly(turns)},
    optional=MESSAGES_FIELDS)
MESSAGES_SETTINGS = settings(max_examples=examples(250), deadline=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@MESSAGES_SETTINGS
@given(body=messages_bodies, key=st.sampled_from(sorted(ROUTED_TO)))
def test_no_messages_body_gets_a_500_or_an_unmeant_request(mgw, body, key):
    result = send_messages(mgw, key, json.dumps(body).encode())
    check_refusal(body, result)
    if result is not None:
        assert 400 <= result[0] < 500, (result, body)
    assert not mgw.live.in_flight


@MESSAGES_SETTINGS
@given(body=messages_bodies, key=st.sampled_from(sorted(ROUTED_TO)))
def test_no_count_tokens_body_gets_a_500_or_an_unmeant_request(mgw, body, key):
    result = send_messages(mgw, key, json.dumps(body).encode(), b"/v1/messages/count_tokens")
    check_refusal(body, result)
    assert result is None or 400 <= result[0] < 500, (result, body)


@settings(
    max_examples=examples(150),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    raw=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()),
    key=st.sampled_from(sorted(ROUTED_TO)),
)
def test_no_raw_messages_body_gets_a_500(mgw, raw, key):
    result = send_messages(mgw, key, raw)
    assert result is None or 400 <= result[0] < 500, (result, raw)


@pytest.mark.parametrize("key", sorted(ROUTED_TO))
def test_messages_deep_nesting_and_long_models_get_anthropic_400s(mgw, key):
    status, body = send_messages(
        mgw, key, b'{"model": "claude-sonnet-4-6", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    )
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and "nested" in body["error"]["message"]
    status, body = send_messages(mgw, key, json.dumps({"model": "m" * 257, "max_tokens": 5, "messages": []}).encode())
    assert status == 400 and "longer than 256 bytes" in body["error"]["message"]


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_are_not_json(gw, mgw, constant):
    """Python's json reads them; a translated body would carry them on as text that is not JSON."""
    status, err = send(
        gw,
        "vk_a",
        b'{"model": "claude-sonnet-4-6", "temperature": '
        + constant
        + b', "messages": [{"role": "user", "content": "hi"}]}',
    )
    assert (status, err["code"]) == (400, "invalid_json") and constant.decode() in err["message"]
    status, body = send_messages(
        mgw, "vk_m_openai", b'{"model": "gpt-4o", "max_tokens": 5, "temperature": ' + constant + b', "messages": []}'
    )
    assert (
        status == 400
        and body["error"]["type"] == "invalid_request_error"
        and constant.decode() in body["error"]["message"]
    )


def test_an_unpaired_surrogate_in_any_field_is_a_400_that_names_it(gw, mgw):
    """A lone "\\ud800" escape parses to a string with no UTF-8 form: no provider, store or
    ledger can take it (the fleet's RedisStore answered 500 gateway_error for an id holding one).
    Refused wherever it is, keys and ids included, in the client's API's shape."""
    chat = {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": False},
            "messages": [{"role": "user", "content": "a\ud800b é"}]}
    for key in ("vk_o", "vk_a", "vk_l"):
        status, err = send(gw, key, json.dumps(chat).encode())
        assert (status, err["code"], err["param"]) == (400, "invalid_string", "messages[0].content"), err
        assert "unpaired surrogate" in err["message"]
    for field, value, param in (
        ("previous_response_id", "\ud800", "previous_response_id"),
        ("conversation", "\ud800", "conversation"),
        ("conversation", {"id": "c\udfff"}, "conversation.id"),
        ("metadata", {"k\ud800": "v"}, "metadata.k\\ud800"),
        ("input", ["ok", "\udc00"], "input[1]"),
    ):
        for key in ("vk_o", "vk_l"):
            body = {"model": "gpt-4o", "input": "hi", field: value}
            status, err = send(gw, key, json.dumps(body).encode(), b"/v1/responses")
            assert (status, err["code"], err["param"]) == (400, "invalid_string", param), (field, err)
    status, err = send(
        gw, "vk_o", json.dumps({"model": "text-embedding-3-small", "input": ["\ud800"]}).encode(), b"/v1/embeddings"
    )
    assert (status, err["code"], err["param"]) == (400, "invalid_string", "input[0]")
    # the bytes of one in UTF-8 (ED A0 80), which JSON cannot escape away either
    status, err = send(gw, "vk_o", b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}')
    assert (status, err["code"]) == (400, "invalid_string")
    message = {"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "a\ud800b"}]}
    for key in ROUTED_TO:
        status, body = send_messages(mgw, key, json.dumps(message).encode())
        assert status == 400 and body["error"]["type"] == "invalid_request_error", body
        assert body["error"]["message"].startswith("messages[0].content: a string with an unpaired surrogate")


def test_paired_surrogates_and_text_that_reads_like_an_escape_pass(gw):
    """An emoji escaped as a pair, and a literal backslash-u text, are text: routed unchanged."""
    for content in ('"\\ud83d\\ude00 ok"', '"\\\\ud800 is how JSON escapes one"', '"\\uD83D\\uDE00"', '"\xed\x9f\xbf"'):
        raw = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": ' + content.encode("latin-1") + b"}]}"
        assert send(gw, "vk_o", raw) is None, content
