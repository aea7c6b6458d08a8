"""End to end: the official anthropic SDK -> the real gateway (mitmdump) -> fake providers of each
kind: Anthropic (passthrough), OpenAI and DeepSeek (translation to Chat Completions)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import anthropic
import pytest

from tests import rawhttp
from tests.e2e.test_anthropic_e2e import anthropic_message, stream_events, text_block, tool_block
from tests.fakeprovider import Received, Reply, openai_completion

pytestmark = pytest.mark.e2e

KEYS = {
    "vk_msg_anthropic": {"provider": "anthropic", "api_key": "sk-ant-msg-real-0001", "name": "msg-anthropic"},
    "vk_msg_openai": {"provider": "openai", "api_key": "sk-msg-openai-real-0002", "name": "msg-openai",
                      "models": ["gpt-4o", "gpt-5", "gpt-4o-mini"]},
    "vk_msg_deepseek": {"provider": "deepseek", "api_key": "sk-msg-deepseek-real-0003", "name": "msg-deepseek"},
    "vk_msg_slow": {"provider": "openai", "api_key": "sk-msg-slow-real-0004", "name": "msg-slow", "rpm": 1},
}
SECRETS = [s for vk, e in KEYS.items() for s in (vk, e["api_key"])]
PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def gateway(gateway_factory, provider_server):
    keys = {"providers": {"anthropic": {"base_url": provider_server.url + "/v1"},
                          "openai": {"base_url": provider_server.url + "/v1"},
                          "deepseek": {"base_url": provider_server.url + "/ds"}},
            "virtual_keys": KEYS}
    return gateway_factory(keys)


def client(gateway, key: str, auth: str = "x-api-key", **kw) -> anthropic.Anthropic:
    creds = {"api_key": key} if auth == "x-api-key" else {"auth_token": key}
    return anthropic.Anthropic(base_url=gateway.url, max_retries=0, timeout=20, **creds, **kw)


def only(provider) -> Received:
    assert provider.wait_received(1)
    assert len(provider.received) == 1, [r.path for r in provider.received]
    return provider.received[0]


def openai_tool_call(r: Received) -> Reply:
    body = openai_completion(r.json())
    body["choices"][0]["message"] = {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]}
    body["choices"][0]["finish_reason"] = "tool_calls"
    return Reply.json(body)


def openai_chunks(*deltas, finish="stop", usage=(11, 3, 4), model="gpt-4o", error=None) -> list[bytes]:
    def chunk(delta, fin=None):
        return {"id": "chatcmpl-s1", "object": "chat.completion.chunk", "created": 1, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": fin}]}
    events = [chunk({"role": "assistant", "content": ""})] + [chunk(d) for d in deltas]
    if error:
        return [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events] + [
            b"data: " + json.dumps({"error": error}).encode() + b"\n\n"
        ]
    events.append(chunk({}, finish))
    events.append(
        {
            "id": "chatcmpl-s1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": model,
            "choices": [],
            "usage": {
                "prompt_tokens": usage[0],
                "completion_tokens": usage[1],
                "total_tokens": usage[0] + usage[1],
                "prompt_tokens_details": {"cached_tokens": usage[2]},
            },
        }
    )
    return [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


def no_secrets(gateway) -> None:
    log = gateway.log()
    for secret in SECRETS:
        assert secret not in log


# --- anthropic: passthrough ------------------------------------------------------------------


def test_passthrough_create_with_x_api_key_and_bearer(gateway, provider):
    provider.reset(lambda r: Reply.json(anthropic_message([{"type": "text", "text": "Bonjour"}])))
    for auth in ("x-api-key", "bearer"):
        provider.received.clear()
        c = client(gateway, "vk_msg_anthropic", auth, default_headers={"anthropic-version": "2023-06-01"})
        msg = c.messages.create(
            model="claude-sonnet-4-6", max_tokens=64, system=[{"type": "text", "text": "French."}],
            messages=[{"role": "user", "content": "Hello"}])
        assert msg.content[0].text == "Bonjour" and msg.usage.input_tokens == 12
        r = only(provider)
        assert r.path == "/v1/messages"
        assert r.headers["x-api-key"] == "sk-ant-msg-real-0001" and "authorization" not in r.headers
        assert r.headers["anthropic-version"] == "2023-06-01"
        assert r.json()["system"] == [{"type": "text", "text": "French."}]
    no_secrets(gateway)


def test_passthrough_stream_chunk_by_chunk(gateway, provider):
    provider.reset(
        lambda r: Reply.sse(
            stream_events(
                [text_block("Hel", "lo"), tool_block("toolu_1", "get_weather", '{"city":', '"Rome"}')],
                stop_reason="tool_use",
            )
        )
    )
    with client(gateway, "vk_msg_anthropic").messages.stream(model="claude-sonnet-4-6", max_tokens=64, tools=[WEATHER],
                                                             messages=[{"role": "user", "content": "hi"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello"
    assert final.stop_reason == "tool_use" and final.content[1].input == {"city": "Rome"}
    assert final.usage.output_tokens == 21 and final.usage.cache_read_input_tokens == 8
    assert only(provider).json()["stream"] is True


def test_claude_code_shaped_request_reaches_anthropic_byte_for_byte(gateway, provider):
    provider.reset(lambda r: Reply.json(anthropic_message([{"type": "text", "text": "ok"}])))
    tools = [
        {
            "name": f"Tool{i}",
            "description": "d" * 50,
            "input_schema": {"type": "object", "properties": {"x": {"type": "string"}}},
        }
        for i in range(24)
    ]
    tools[-1]["cache_control"] = {"type": "ephemeral"}
    history = []
    for i in range(30):
        history.append({"role": "user", "content": [{"type": "text", "text": f"question {i} \u00e9\u4e2d"}]})
        history.append({"role": "assistant", "content": [{"type": "text", "text": f"answer {i}"}]})
    history.append(
        {"role": "user", "content": [{"type": "text", "text": "now", "cache_control": {"type": "ephemeral"}}]}
    )
    body = {"model": "claude-sonnet-4-6", "max_tokens": 32000, "messages": history, "tools": tools,
            "system": [{"type": "text", "text": "You are Claude Code", "cache_control": {"type": "ephemeral"}}],
            "metadata": {"user_id": "user_abc_account_def_session_ghi"}, "thinking": {"type": "adaptive"},
            "output_config": {"effort": "high"}, "context_management": {"edits": []}, "stream": False}
    raw = json.dumps(body, indent=1, ensure_ascii=False).encode()  # odd spacing: proves nothing is re-encoded
    headers = {"x-api-key": "vk_msg_anthropic", "anthropic-version": "2023-06-01", "content-type": "application/json",
               "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27",
               "x-claude-code-session-id": "sess-123", "x-app": "cli", "user-agent": "claude-cli/2.1.0 (external, cli)"}
    r = rawhttp.request(gateway.url, "POST", "/v1/messages?beta=true", content=raw, headers=headers)
    assert r.status_code == 200, r.content
    got = only(provider)
    assert got.body == raw
    assert got.path == "/v1/messages?beta=true"
    for name in ("anthropic-beta", "anthropic-version", "x-claude-code-session-id", "x-app", "user-agent"):
        assert got.headers[name] == headers[name]
    assert got.headers["x-api-key"] == "sk-ant-msg-real-0001" and "authorization" not in got.headers
    assert "x-gateway-dropped-params" not in r.headers


def test_count_tokens_forwarded_to_anthropic_refused_elsewhere(gateway, provider):
    provider.reset(lambda r: Reply.json({"input_tokens": 17}))
    count = client(gateway, "vk_msg_anthropic").messages.count_tokens(model="claude-sonnet-4-6",
                                                                      messages=[{"role": "user", "content": "hi"}])
    assert count.input_tokens == 17
    assert only(provider).path == "/v1/messages/count_tokens"
    provider.received.clear()
    with pytest.raises(anthropic.BadRequestError) as info:
        client(gateway, "vk_msg_openai").messages.count_tokens(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )
    assert "not available" in info.value.message and "openai" in info.value.message
    assert info.value.body["error"]["type"] == "invalid_request_error"
    assert provider.received == []


def test_models_in_anthropic_shape_with_anthropic_version(gateway, provider):
    page = client(gateway, "vk_msg_openai").models.list()
    assert [m.id for m in page.data] == ["gpt-4o", "gpt-5", "gpt-4o-mini"]
    assert page.data[0].type == "model" and page.data[0].display_name == "gpt-4o"
    raw = rawhttp.request(
        gateway.url, "GET", "/v1/models", headers={"x-api-key": "vk_msg_openai", "anthropic-version": "2023-06-01"}
    ).json()
    assert raw["has_more"] is False and raw["first_id"] == "gpt-4o" and raw["last_id"] == "gpt-4o-mini"
    assert raw["data"][0]["created_at"].endswith("Z")
    plain = rawhttp.request(gateway.url, "GET", "/v1/models", headers={"authorization": "Bearer vk_msg_openai"}).json()
    assert plain["object"] == "list" and plain["data"][0]["object"] == "model"
    one = client(gateway, "vk_msg_openai").models.retrieve("gpt-5")
    assert one.id == "gpt-5" and one.type == "model"
    with pytest.raises(anthropic.NotFoundError):
        client(gateway, "vk_msg_openai").models.retrieve("o3")
    assert provider.received == []


# --- openai / deepseek: translation ----------------------------------------------------------


def test_translation_text_system_blocks_and_dropped_params(gateway, provider):
    provider.reset(lambda r: Reply.json(openai_completion(r.json(), "Bonjour")))
    raw = client(gateway, "vk_msg_openai").messages.with_raw_response.create(
        model="gpt-4o",
        max_tokens=50,
        stop_sequences=["END"],
        system=[
            {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "French."},
        ],
        metadata={"user_id": "u-42"},
        messages=[{"role": "user", "content": "Hello"}],
        extra_body={"context_management": {"edits": []}, "temperature": 0.2, "top_p": 0.9},
    )
    msg = raw.parse()
    assert msg.type == "message" and msg.role == "assistant" and msg.content[0].text == "Bonjour"
    assert msg.stop_reason == "end_turn" and (msg.usage.input_tokens, msg.usage.output_tokens) == (5, 2)
    assert raw.headers["x-gateway-dropped-params"] == "cache_control, context_management"
    r = only(provider)
    assert r.path == "/v1/chat/completions" and r.headers["authorization"] == "Bearer sk-msg-openai-real-0002"
    assert "x-api-key" not in r.headers
    assert r.json() == {"model": "gpt-4o", "messages": [{"role": "system", "content": "Be brief.\n\nFrench."},
                                                        {"role": "user", "content": "Hello"}],
                        "max_tokens": 50, "temperature": 0.2, "top_p": 0.9, "stop": ["END"], "user": "u-42"}
    deadline = time.monotonic() + 10  # the access line is written with the accounting's next flush
    while "dropped=cache_control,context_management" not in gateway.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (
        "key=msg-openai provider=openai model=gpt-4o tokens=5/2 dropped=cache_control,context_management"
        in gateway.log()
    )


def test_translation_tools_round_trip_and_images(gateway, provider):
    provider.reset(openai_tool_call)
    c = client(gateway, "vk_msg_openai")
    first = c.messages.create(
        model="gpt-4o",
        max_tokens=50,
        tools=[WEATHER],
        tool_choice={"type": "any"},
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather here?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
                ],
            }
        ],
    )
    assert first.stop_reason == "tool_use"
    assert [b.type for b in first.content] == ["text", "tool_use"]
    call = first.content[1]
    assert (call.id, call.name, call.input) == ("call_1", "get_weather", {"city": "Paris"})
    sent = only(provider).json()
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": WEATHER["input_schema"],
            },
        }
    ]
    assert sent["tool_choice"] == "required"
    assert sent["messages"][0]["content"] == [
        {"type": "text", "text": "Weather here?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]

    provider.reset(lambda r: Reply.json(openai_completion(r.json(), "Sunny")))
    second = c.messages.create(model="gpt-4o", max_tokens=50, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "18C, sunny"},
                                     {"type": "text", "text": "Thanks"}]}])
    assert second.content[0].text == "Sunny"
    assert only(provider).json()["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
        {"role": "user", "content": "Thanks"},
    ]


def test_translation_stream_text_and_tools_with_final_message(gateway, provider):
    provider.reset(
        lambda r: Reply.sse(
            openai_chunks(
                {"content": "Let me "},
                {"content": "check."},
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_a",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ""},
                        }
                    ]
                },
                {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]},
                {"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]},
                finish="tool_calls",
            )
        )
    )
    events = []
    with client(gateway, "vk_msg_openai").messages.stream(model="gpt-4o", max_tokens=50, tools=[WEATHER],
                                                          messages=[{"role": "user", "content": "hi"}]) as stream:
        for ev in stream:
            events.append(ev.type)
        final = stream.get_final_message()
    assert final.content[0].text == "Let me check."
    assert final.content[1].type == "tool_use" and final.content[1].input == {"city": "Oslo"}
    assert final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.cache_read_input_tokens, final.usage.output_tokens) == (7, 4, 3)
    raw = [
        e
        for e in events
        if e in ("message_start", "content_block_start", "content_block_stop", "message_delta", "message_stop")
    ]
    assert raw == ["message_start", "content_block_start", "content_block_stop", "content_block_start",
                   "content_block_stop", "message_delta", "message_stop"]
    sent = only(provider).json()
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


def test_a_stop_sequence_the_provider_names_reaches_the_sdk(gateway, provider):
    """An OpenAI-compatible server that says which stop string ended the answer (vLLM's
    choices[0].stop_reason): the SDK sees stop_reason "stop_sequence" and the sequence, whole
    answer and stream. OpenAI's own bare "stop" stays end_turn (a natural end looks the same)."""
    def vllm(r: Received) -> Reply:
        body = openai_completion(r.json(), "ok")
        body["choices"][0].update(finish_reason="stop", stop_reason="END")
        return Reply.json(body)

    provider.reset(vllm)
    ask = {
        "model": "gpt-4o",
        "max_tokens": 20,
        "stop_sequences": ["###", "END"],
        "messages": [{"role": "user", "content": "hi"}],
    }
    msg = client(gateway, "vk_msg_openai").messages.create(**ask)
    assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", "END")
    assert only(provider).json()["stop"] == ["###", "END"]
    provider.reset(lambda r: Reply.json(openai_completion(r.json(), "ok")))
    msg = client(gateway, "vk_msg_openai").messages.create(**ask)
    assert (msg.stop_reason, msg.stop_sequence) == ("end_turn", None)

    def vllm_stream(r: Received) -> Reply:
        events = openai_chunks({"content": "ok"})
        final = json.loads(events[-3][6:])  # the chunk with the finish reason
        final["choices"][0]["stop_reason"] = "###"
        events[-3] = b"data: " + json.dumps(final).encode() + b"\n\n"
        return Reply.sse(events)

    provider.reset(vllm_stream)
    with client(gateway, "vk_msg_openai").messages.stream(**ask) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "###")


def test_deepseek_reasoner_reasoning_becomes_thinking(gateway, provider):
    def reply(r: Received) -> Reply:
        if r.json().get("stream"):
            return Reply.sse(
                openai_chunks(
                    {"reasoning_content": "Hmm, "},
                    {"reasoning_content": "2+2=4."},
                    {"content": "4"},
                    model="deepseek-reasoner",
                )
            )
        body = openai_completion(r.json(), "4")
        body["choices"][0]["message"]["reasoning_content"] = "2+2=4."
        return Reply.json(body)
    provider.reset(reply)
    c = client(gateway, "vk_msg_deepseek")
    msg = c.messages.create(
        model="deepseek-reasoner",
        max_tokens=100,
        thinking={"type": "enabled", "budget_tokens": 2048},
        messages=[{"role": "user", "content": "2+2?"}],
    )
    assert [b.type for b in msg.content] == ["thinking", "text"] and msg.content[0].thinking == "2+2=4."
    r = only(provider)
    assert r.path == "/ds/chat/completions" and "reasoning_effort" not in r.json()  # it reasons anyway
    provider.received.clear()
    with c.messages.stream(
        model="deepseek-reasoner", max_tokens=100, messages=[{"role": "user", "content": "2+2?"}]
    ) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "Hmm, 2+2=4." and final.content[1].text == "4"


def test_thinking_becomes_reasoning_effort_for_reasoning_models(gateway, provider):
    provider.reset(lambda r: Reply.json(openai_completion(r.json(), "ok")))
    raw = client(gateway, "vk_msg_openai").messages.with_raw_response.create(
        model="gpt-5", max_tokens=4000, thinking={"type": "enabled", "budget_tokens": 5000},
        messages=[{"role": "user", "content": "x"}])
    sent = only(provider).json()
    assert sent["reasoning_effort"] == "medium" and sent["max_completion_tokens"] == 4000 and "max_tokens" not in sent
    assert raw.headers["x-gateway-dropped-params"] == "thinking"


def test_async_client_create_and_stream(gateway, provider):
    provider.reset(lambda r: Reply.sse(openai_chunks({"content": "a"}, {"content": "b"})) if r.json().get("stream")
                   else Reply.json(openai_completion(r.json(), "plain")))

    async def main():
        async with anthropic.AsyncAnthropic(
            base_url=gateway.url, api_key="vk_msg_openai", max_retries=0, timeout=20
        ) as c:
            msg = await c.messages.create(model="gpt-4o", max_tokens=10, messages=[{"role": "user", "content": "x"}])
            async with c.messages.stream(
                model="gpt-4o", max_tokens=10, messages=[{"role": "user", "content": "x"}]
            ) as s:
                final = await s.get_final_message()
            return msg, final
    msg, final = asyncio.run(main())
    assert msg.content[0].text == "plain" and final.content[0].text == "ab"


# --- errors ----------------------------------------------------------------------------------


def test_gateway_refusals_raise_the_sdk_classes(gateway, provider):
    provider.reset(lambda r: Reply.json(openai_completion(r.json(), "ok")))
    ask = dict(max_tokens=10, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.AuthenticationError) as info:
        client(gateway, "vk_nobody").messages.create(model="gpt-4o", **ask)
    assert info.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid virtual key"},
        "request_id": None,
    }
    r = rawhttp.request(gateway.url, "POST", "/v1/messages", json={"model": "gpt-4o", **ask},
                        headers={"anthropic-version": "2023-06-01"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.PermissionDeniedError) as info:
        client(gateway, "vk_msg_openai").messages.create(model="o3", **ask)
    assert info.value.body["error"]["type"] == "permission_error"
    with pytest.raises(anthropic.BadRequestError) as info:
        client(gateway, "vk_msg_openai").messages.create(model="gpt-4o", extra_body={"top_k": 5}, **ask)
    assert "top_k" in info.value.message
    r = rawhttp.request(
        gateway.url, "POST", "/v1/messages", content=b"{not json", headers={"x-api-key": "vk_msg_openai"}
    )
    assert r.status_code == 400 and r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
    c = client(gateway, "vk_msg_slow")
    c.messages.create(model="gpt-4o", **ask)
    with pytest.raises(anthropic.RateLimitError) as info:
        c.messages.create(model="gpt-4o", **ask)
    assert info.value.response.headers.get("retry-after")
    assert len(provider.received) == 1  # only the first of the slow key's requests
    r = rawhttp.request(gateway.url, "GET", "/v1/nowhere", headers={"anthropic-version": "2023-06-01"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize("status,kind,cls", [
    (400, "invalid_request_error", anthropic.BadRequestError),
    (401, "invalid_api_key", anthropic.AuthenticationError),
    (403, "permission_error", anthropic.PermissionDeniedError),
    (404, "not_found_error", anthropic.NotFoundError),
    (429, "rate_limit_exceeded", anthropic.RateLimitError),
    (529, "overloaded_error", anthropic.APIStatusError),
])
def test_provider_errors_translated(gateway, provider, status, kind, cls):
    provider.reset(
        lambda r: Reply.json(
            {"error": {"message": f"upstream says {status}", "type": kind, "param": None, "code": None}}, status
        )
    )
    with pytest.raises(cls) as info:
        client(gateway, "vk_msg_openai").messages.create(
            model="gpt-4o", max_tokens=10, messages=[{"role": "user", "content": "x"}]
        )
    assert info.value.status_code == status
    message = info.value.body["error"]["message"]
    assert info.value.body["type"] == "error" and message.endswith(f"upstream says {status}")
    if status in (401, 403):  # the provider refused the gateway's real key: said so, by key name
        assert message.startswith("the provider (openai) ") and "virtual key 'msg-openai'" in message
    else:
        assert message == f"upstream says {status}"
    if status == 529:
        assert info.value.body["error"]["type"] == "overloaded_error"


def test_passthrough_anthropic_errors_unchanged(gateway, provider):
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    provider.reset(lambda r: Reply.json(error, 529))
    with pytest.raises(anthropic.APIStatusError) as info:
        client(gateway, "vk_msg_anthropic").messages.create(model="claude-sonnet-4-6", max_tokens=10,
                                                            messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 529 and info.value.body == error
    provider.reset(lambda r: Reply(502, b"<html>bad gateway</html>", {"content-type": "text/html"}))
    with pytest.raises(anthropic.InternalServerError) as info:
        client(gateway, "vk_msg_anthropic").messages.create(model="claude-sonnet-4-6", max_tokens=10,
                                                            messages=[{"role": "user", "content": "x"}])
    assert info.value.body["type"] == "error" and "bad gateway" in info.value.body["error"]["message"]


def test_mid_stream_failure_is_an_error_event(gateway, provider):
    provider.reset(
        lambda r: Reply.sse(
            openai_chunks({"content": "partial"}, error={"message": "boom upstream", "type": "server_error"})
        )
    )
    with pytest.raises(anthropic.APIStatusError) as info:
        with client(gateway, "vk_msg_openai").messages.stream(model="gpt-4o", max_tokens=10,
                                                              messages=[{"role": "user", "content": "x"}]) as stream:
            for _ in stream:
                pass
    assert "boom upstream" in str(info.value)
    # a stream that just stops (no finish, no [DONE]) also ends in an error event
    provider.reset(lambda r: Reply.sse(openai_chunks({"content": "partial"})[:2]))
    r = rawhttp.request(
        gateway.url,
        "POST",
        "/v1/messages",
        headers={"x-api-key": "vk_msg_openai"},
        json={"model": "gpt-4o", "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.content.decode().rstrip().splitlines()[-2:] == [
        "event: error",
        'data: {"type":"error","error":{"type":"api_error","message":"the provider\'s stream ended before the answer was complete"},"request_id":null}',
    ]


# --- usage ledger ----------------------------------------------------------------------------


def test_usage_read_from_anthropic_format_bytes(gateway_factory, provider_server, provider):
    keys = {
        "providers": {
            "anthropic": {"base_url": provider_server.url + "/v1"},
            "openai": {"base_url": provider_server.url + "/v1"},
        },
        "virtual_keys": KEYS,
    }
    gw = gateway_factory(keys)
    provider.reset(lambda r: Reply.sse(openai_chunks({"content": "a"}, usage=(100, 20, 40))) if r.json().get("stream")
                   else Reply.json(openai_completion(r.json(), "x")))
    c = client(gw, "vk_msg_openai")
    c.messages.create(model="gpt-4o", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    with c.messages.stream(model="gpt-4o", max_tokens=10, messages=[{"role": "user", "content": "x"}]) as s:
        s.get_final_message()
    provider.reset(lambda r: Reply.sse(stream_events([text_block("hi")])))
    with client(gw, "vk_msg_anthropic").messages.stream(model="claude-sonnet-4-6", max_tokens=10,
                                                        messages=[{"role": "user", "content": "x"}]) as s:
        s.get_final_message()
    db = Path(gw.tmp.name) / "usage.sqlite3"
    deadline = time.monotonic() + 10
    rows = []
    while time.monotonic() < deadline and len(rows) < 3:
        time.sleep(0.3)
        with sqlite3.connect(db) as conn:
            rows = conn.execute(
                "SELECT key_name, model, prompt_tokens, completion_tokens, cached_tokens, streamed FROM usage ORDER BY ts"
            ).fetchall()
    assert rows == [("msg-openai", "gpt-4o", 5, 2, 0, 0), ("msg-openai", "gpt-4o", 100, 20, 40, 1),
                    ("msg-anthropic", "claude-sonnet-4-6", 38, 21, 8, 1)]
    no_secrets(gw)


@pytest.mark.parametrize("key,reply", [
    ("vk_msg_openai", lambda r: Reply.sse(openai_chunks({"content": "partial"})[:2], cut=True)),
    ("vk_msg_anthropic", lambda r: Reply.sse(stream_events([text_block("partial", "more")])[:4], cut=True)),
])
def test_a_provider_stream_that_resets_ends_in_an_error_event(gateway, provider, key, reply):
    provider.reset(reply)
    with pytest.raises(anthropic.APIStatusError) as info:
        with client(gateway, key).messages.stream(
            model="gpt-4o", max_tokens=10, messages=[{"role": "user", "content": "x"}]
        ) as s:
            for _ in s:
                pass
    assert "broke off" in str(info.value) or "ended before" in str(info.value)
