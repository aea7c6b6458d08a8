"""Unit tests of the OpenAI Chat -> Anthropic Messages pair's mapping rules: pure functions, no gateway process."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from addon.wire.errors import GatewayError
from addon.providers.registry import PROVIDERS
from addon.translate.registry import PAIRS
from addon.translate.openai_chat_anthropic import (
    DEFAULT_MAX_TOKENS,
    FALLBACK_MAX_TOKENS,
    OpenAIChatToAnthropic,
    StreamTranslator,
    default_max_tokens,
)
from addon.wire.streams import fail_closed_stream

PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


def req(messages=None, **params) -> dict:
    return {"model": "claude-sonnet-4-6", "messages": messages or [{"role": "user", "content": "hi"}], **params}


def prepare(request: dict):
    upstream, exchange = OpenAIChatToAnthropic(now=lambda: 1700000000).prepare(request)
    return upstream, exchange


def upstream_body(request: dict) -> dict:
    upstream, _ = prepare(request)
    return json.loads(upstream.body)


def rejects(request: dict) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        prepare(request)
    assert info.value.status == 400
    return info.value


# --- provider seams ------------------------------------------------------------------------

def test_registered_with_its_endpoint():
    provider = PROVIDERS["anthropic"]
    assert provider.name == "anthropic"
    assert provider.default_base_url == "https://api.anthropic.com/v1"
    assert provider.endpoint_path == "/messages"
    assert provider.secret_header == "x-api-key"
    assert provider.auth_headers("sk-ant-real") == {"x-api-key": "sk-ant-real"}
    assert isinstance(PAIRS[("openai_chat", provider.api)], OpenAIChatToAnthropic)


def test_headers_carry_version_only():
    upstream, _ = prepare(req())  # the real key is the provider's header (providers/anthropic.py)
    assert upstream.headers == {"anthropic-version": "2023-06-01", "content-type": "application/json"}


# --- request: messages -----------------------------------------------------------------------

def test_system_and_developer_messages_anywhere_become_system_in_order():
    body = upstream_body(req([
        {"role": "system", "content": "first"},
        {"role": "user", "content": "q1"},
        {"role": "developer", "content": [{"type": "text", "text": "second"}]},
        {"role": "assistant", "content": "a1"},
        {"role": "system", "content": "third"},
        {"role": "user", "content": "q2"},
    ]))
    assert body["system"] == [{"type": "text", "text": t} for t in ("first", "second", "third")]
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]


def test_no_system_key_without_system_messages():
    assert "system" not in upstream_body(req())


def test_user_string_and_text_parts_become_text_blocks():
    body = upstream_body(
        req([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    )
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]


def test_data_url_image_becomes_base64_source():
    body = upstream_body(req([{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
    ]}]))
    assert body["messages"][0]["content"][1] == {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64},
    }


def test_http_image_url_becomes_url_source_not_downloaded():
    url = "https://example.com/cat.jpg"
    body = upstream_body(req([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]))
    assert body["messages"][0]["content"] == [{"type": "image", "source": {"type": "url", "url": url}}]


@pytest.mark.parametrize("url", ["data:image/bmp;base64,AAAA", "data:image/png,notbase64", "data:image/png;base64,@@@", "ftp://x/y.png"])
def test_unusable_image_urls_are_rejected(url):
    error = rejects(req([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]))
    assert error.param == "messages[0].content[0]"


def test_unsupported_content_part_is_rejected_with_its_position():
    error = rejects(
        req([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}}]}])
    )
    assert error.param == "messages[0].content[0]"
    assert "input_audio" in error.message


def test_assistant_tool_calls_become_tool_use_and_tool_results_follow_in_one_user_turn():
    body = upstream_body(req([
        {"role": "user", "content": "weather in Paris and Rome?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "rain"}]},
        {"role": "user", "content": "thanks"},
    ]))
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "weather in Paris and Rome?"}]},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "weather", "input": {"city": "Rome"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "rain"}]},
            {"type": "text", "text": "thanks"},
        ]},
    ]


def test_tool_results_come_first_in_their_user_turn():
    body = upstream_body(
        req(
            [
                {"role": "user", "content": "go"},
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                },
                {"role": "user", "content": "by the way"},
                {"role": "tool", "tool_call_id": "c1", "content": "done"},
            ]
        )
    )
    assert [b["type"] for b in body["messages"][-1]["content"]] == ["tool_result", "text"]


def test_assistant_tool_call_without_content_and_empty_arguments():
    body = upstream_body(
        req(
            [
                {"role": "user", "content": "time?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "now", "arguments": ""}}],
                },
                {"role": "tool", "tool_call_id": "c", "content": "noon"},
            ]
        )
    )
    assert body["messages"][1] == {
        "role": "assistant",
        "content": [{"type": "tool_use", "id": "c", "name": "now", "input": {}}],
    }


@pytest.mark.parametrize("arguments", ["{not json", "[1, 2]", '"text"'])
def test_tool_arguments_that_are_not_a_json_object_are_rejected_naming_the_message(arguments):
    error = rejects(
        req(
            [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}],
                },
            ]
        )
    )
    assert error.param == "messages[1].tool_calls[0].function.arguments"
    assert "message 1" in error.message


def test_consecutive_same_role_messages_are_merged_and_empty_text_never_sent():
    body = upstream_body(req([
        {"role": "user", "content": "a"},
        {"role": "user", "content": ""},
        {"role": "user", "content": [{"type": "text", "text": "  "}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": "c"},
        {"role": "assistant", "content": "d"},
        {"role": "user", "content": "e"},
    ]))
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "c"}, {"type": "text", "text": "d"}]},
        {"role": "user", "content": [{"type": "text", "text": "e"}]},
    ]


def test_an_empty_assistant_message_between_users_merges_the_users():
    body = upstream_body(
        req([{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "b"}])
    )
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]


def test_final_assistant_prefill_loses_trailing_whitespace():
    body = upstream_body(req([{"role": "user", "content": "a"}, {"role": "assistant", "content": "The answer is "}]))
    assert body["messages"][-1]["content"] == [{"type": "text", "text": "The answer is"}]


def test_only_system_messages_is_rejected():
    error = rejects(req([{"role": "system", "content": "x"}]))
    assert error.param == "messages"


def test_unknown_role_is_rejected():
    assert rejects(req([{"role": "function", "name": "f", "content": "x"}])).param == "messages[0].role"


def test_tool_message_without_id_is_rejected():
    assert rejects(req([{"role": "tool", "content": "x"}])).param == "messages[0].tool_call_id"


def test_cache_control_on_text_parts_is_kept():
    body = upstream_body(
        req([{"role": "user", "content": [{"type": "text", "text": "long", "cache_control": {"type": "ephemeral"}}]}])
    )
    assert body["messages"][0]["content"][0]["cache_control"] == {"type": "ephemeral"}


# --- request: flat parameters ----------------------------------------------------------------

@pytest.mark.parametrize("params,expected", [
    ({"max_tokens": 100}, 100),
    ({"max_completion_tokens": 200}, 200),
    ({"max_completion_tokens": 200, "max_tokens": 100}, 200),
])
def test_max_tokens_mapping(params, expected):
    assert upstream_body(req(**params))["max_tokens"] == expected


@pytest.mark.parametrize("model,expected", [
    ("claude-3-haiku-20240307", 4096),
    ("claude-3-5-sonnet-latest", 8192),
    ("claude-sonnet-4-6", 16384),
    ("claude-opus-4-1-20250805", 16384),
    ("some-proxy-model", FALLBACK_MAX_TOKENS),
])
def test_default_max_tokens_per_model_prefix(model, expected):
    assert default_max_tokens(model) == expected
    assert upstream_body({"model": model, "messages": [{"role": "user", "content": "x"}]})["max_tokens"] == expected


def sdk_models() -> list[str]:
    """The current (not deprecated) models the installed anthropic SDK names."""
    import typing

    from anthropic._data.deprecated_models import DEPRECATED_MODELS
    from anthropic.types.model_param import ModelParam

    named = [arg for part in typing.get_args(ModelParam) for arg in typing.get_args(part) if isinstance(arg, str)]
    return [model for model in named if model not in DEPRECATED_MODELS]


def test_every_current_sdk_model_has_a_default_the_sdk_sends_without_streaming():
    """A family missing from DEFAULT_MAX_TOKENS got 4096; each default stays below the size at
    which the anthropic SDK refuses a non-streamed request (its own check, asked)."""
    import anthropic
    from anthropic._constants import MODEL_NONSTREAMING_TOKENS

    models = sdk_models()
    assert "claude-opus-5" in models and "claude-mythos-5" in models  # the SDK's list was read
    sdk = anthropic.Anthropic(api_key="unused")
    for model in models:
        assert default_max_tokens(model) > FALLBACK_MAX_TOKENS, model
        sdk._calculate_nonstreaming_timeout(default_max_tokens(model), MODEL_NONSTREAMING_TOKENS.get(model))
    for value in set(DEFAULT_MAX_TOKENS.values()):
        sdk._calculate_nonstreaming_timeout(value, None)


@pytest.mark.parametrize("value", [0, -1, "10", True])
def test_invalid_max_tokens_rejected(value):
    assert rejects(req(max_tokens=value)).param == "max_tokens"


@pytest.mark.parametrize("stop,expected", [("END", ["END"]), (["a", "b"], ["a", "b"]), (["", "x"], ["x"])])
def test_stop_becomes_stop_sequences(stop, expected):
    assert upstream_body(req(stop=stop))["stop_sequences"] == expected


def test_empty_stop_list_is_not_sent():
    assert "stop_sequences" not in upstream_body(req(stop=[]))


@pytest.mark.parametrize("given,sent", [(0, 0.0), (0.7, 0.7), (1.0, 1.0), (1.5, 1.0), (2, 1.0)])
def test_temperature_clamped_to_anthropic_range(given, sent):
    assert upstream_body(req(temperature=given))["temperature"] == sent


def test_top_p_top_k_user_and_stream_pass():
    body = upstream_body(req(top_p=0.9, top_k=40, user="user-42", stream=True))
    assert (body["top_p"], body["top_k"], body["metadata"], body["stream"]) == (0.9, 40, {"user_id": "user-42"}, True)


def test_params_not_given_are_not_sent():
    body = upstream_body(req())
    assert set(body) == {"model", "messages", "max_tokens"}


def test_n_greater_than_one_rejected():
    error = rejects(req(n=2))
    assert error.param == "n" and "one choice" in error.message


def test_n_of_one_is_fine():
    assert "n" not in upstream_body(req(n=1))


PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}},
    "required": ["name"],
    "additionalProperties": False,
}


def test_json_schema_response_format_becomes_native_output_format():
    body = upstream_body(
        req(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "person", "strict": True, "schema": PERSON_SCHEMA},
            }
        )
    )
    assert body["output_config"] == {"format": {"type": "json_schema", "schema": PERSON_SCHEMA}}
    assert "response_format" not in body


@pytest.mark.parametrize(
    "response_format",
    [{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x"}}, {"type": "yaml"}],
)
def test_other_json_response_formats_rejected(response_format):
    assert rejects(req(response_format=response_format)).param == "response_format"


def test_text_response_format_is_harmless():
    assert "response_format" not in upstream_body(req(response_format={"type": "text"}))


@pytest.mark.parametrize(
    "name,value",
    [
        ("presence_penalty", 0.5),
        ("frequency_penalty", -1),
        ("logprobs", True),
        ("logit_bias", {"1": 5}),
        ("top_logprobs", 3),
        ("functions", [{"name": "f", "parameters": {}}]),
        ("function_call", "auto"),
    ],
)
def test_answer_changing_openai_only_params_rejected(name, value):
    assert rejects(req(**{name: value})).param == name


@pytest.mark.parametrize(
    "name,value",
    [
        ("presence_penalty", 0),
        ("logprobs", False),
        ("seed", 7),
        ("store", True),
        ("service_tier", "auto"),
        ("prediction", {"type": "content", "content": "x"}),
    ],
)
def test_harmless_openai_only_params_dropped(name, value):
    assert name not in upstream_body(req(**{name: value}))


def test_reasoning_effort_becomes_thinking_budget():
    body = upstream_body(req(reasoning_effort="medium", temperature=0.2))
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 4096}
    assert body["max_tokens"] > 4096
    assert "temperature" not in body


def test_reasoning_effort_with_too_small_max_tokens_rejected():
    assert rejects(req(reasoning_effort="high", max_tokens=1000)).param == "max_tokens"


def test_thinking_passthrough_from_extra_body():
    body = upstream_body(req(thinking={"type": "enabled", "budget_tokens": 2048}))
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 2048}


# --- request: tools --------------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_tools_become_input_schema_tools():
    body = upstream_body(req(tools=[WEATHER_TOOL, {"type": "function", "function": {"name": "now"}}]))
    assert body["tools"] == [
        {
            "name": "weather",
            "description": "Weather for a city",
            "input_schema": WEATHER_TOOL["function"]["parameters"],
        },
        {"name": "now", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in body


@pytest.mark.parametrize("choice,expected", [
    ("auto", {"type": "auto"}),
    ("required", {"type": "any"}),
    ("none", {"type": "none"}),
    ({"type": "function", "function": {"name": "weather"}}, {"type": "tool", "name": "weather"}),
])
def test_tool_choice_mapping(choice, expected):
    assert upstream_body(req(tools=[WEATHER_TOOL], tool_choice=choice))["tool_choice"] == expected


def test_parallel_tool_calls_false_disables_parallel_use():
    assert upstream_body(req(tools=[WEATHER_TOOL], parallel_tool_calls=False))["tool_choice"] == {
        "type": "auto",
        "disable_parallel_tool_use": True,
    }
    assert upstream_body(req(tools=[WEATHER_TOOL], tool_choice="required", parallel_tool_calls=False))[
        "tool_choice"
    ] == {"type": "any", "disable_parallel_tool_use": True}
    assert "tool_choice" not in upstream_body(req(tools=[WEATHER_TOOL], parallel_tool_calls=True))


def test_tool_history_without_tools_declares_them_uncallable():
    body = upstream_body(
        req(
            [
                {"role": "user", "content": "go"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                        {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}},
                        {"id": "c3", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "1"},
                {"role": "tool", "tool_call_id": "c2", "content": "2"},
                {"role": "tool", "tool_call_id": "c3", "content": "3"},
            ]
        )
    )
    assert body["tools"] == [
        {"name": "f", "input_schema": {"type": "object"}},
        {"name": "g", "input_schema": {"type": "object"}},
    ]
    assert body["tool_choice"] == {"type": "none"}


def test_tool_choice_requiring_tools_without_tools_rejected():
    assert rejects(req(tool_choice="required")).param == "tool_choice"
    assert "tool_choice" not in upstream_body(req(tool_choice="none"))


def test_non_function_tool_rejected():
    assert rejects(req(tools=[{"type": "custom", "custom": {"name": "x"}}])).param == "tools[0]"


def test_bad_tool_choice_rejected():
    assert rejects(req(tools=[WEATHER_TOOL], tool_choice="sometimes")).param == "tool_choice"


# --- response (whole body) -------------------------------------------------------------------

def message(content, stop_reason="end_turn", usage=None, **extra) -> bytes:
    return json.dumps({"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-6",
                       "content": content, "stop_reason": stop_reason, "stop_sequence": None,
                       "usage": usage or {"input_tokens": 10, "output_tokens": 5}, **extra}).encode()


def translate(body: bytes, status: int = 200) -> dict:
    _, exchange = prepare(req())
    return json.loads(exchange.translate_body(status, body))


def test_text_response():
    completion = translate(message([{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]))
    assert completion["id"] == "msg_01"
    assert completion["object"] == "chat.completion"
    assert completion["created"] == 1700000000
    assert completion["model"] == "claude-sonnet-4-6"
    choice = completion["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "Hello world"
    assert "tool_calls" not in choice["message"]


def test_tool_use_response():
    completion = translate(message([
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_2", "name": "now", "input": {}},
    ], "tool_use"))
    choice = completion["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."
    calls = choice["message"]["tool_calls"]
    assert [(c["id"], c["type"], c["function"]["name"]) for c in calls] == [
        ("toolu_1", "function", "weather"),
        ("toolu_2", "function", "now"),
    ]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert calls[1]["function"]["arguments"] == "{}"


def test_tool_only_response_has_null_content():
    completion = translate(message([{"type": "tool_use", "id": "t", "name": "f", "input": {}}], "tool_use"))
    assert completion["choices"][0]["message"]["content"] is None


def test_thinking_becomes_reasoning_content():
    completion = translate(
        message([{"type": "thinking", "thinking": "Hmm.", "signature": "sig"}, {"type": "text", "text": "42"}])
    )
    assert completion["choices"][0]["message"]["reasoning_content"] == "Hmm."
    assert completion["choices"][0]["message"]["content"] == "42"


@pytest.mark.parametrize("stop_reason,finish", [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("pause_turn", "stop"), ("max_tokens", "length"),
    ("tool_use", "tool_calls"), ("refusal", "content_filter"), (None, "stop"), ("something_new", "stop"),
])
def test_finish_reasons(stop_reason, finish):
    assert translate(message([{"type": "text", "text": "x"}], stop_reason))["choices"][0]["finish_reason"] == finish


def test_usage_counts_cache_tokens_in_prompt():
    usage = translate(message([{"type": "text", "text": "x"}], usage={
        "input_tokens": 10, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 1000, "output_tokens": 7,
        "cache_creation": {"ephemeral_5m_input_tokens": 100}, "service_tier": "standard"}))["usage"]
    assert usage["prompt_tokens"] == 1110
    assert usage["completion_tokens"] == 7
    assert usage["total_tokens"] == 1117
    assert usage["prompt_tokens_details"] == {"cached_tokens": 1000}


def test_usage_without_cache_fields():
    usage = translate(message([{"type": "text", "text": "x"}], usage={"input_tokens": 3, "output_tokens": 4}))["usage"]
    assert (
        usage["prompt_tokens"],
        usage["completion_tokens"],
        usage["total_tokens"],
        usage["prompt_tokens_details"]["cached_tokens"],
    ) == (3, 4, 7, 0)


def test_non_message_2xx_body_raises_so_the_adapter_answers_502():
    _, exchange = prepare(req())
    with pytest.raises(ValueError):
        exchange.translate_body(200, b'{"type": "something"}')


# --- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("status,anthropic_type,openai_type", [
    (400, "invalid_request_error", "invalid_request_error"),
    (401, "authentication_error", "authentication_error"),
    (403, "permission_error", "permission_error"),
    (404, "not_found_error", "not_found_error"),
    (413, "request_too_large", "invalid_request_error"),
    (429, "rate_limit_error", "rate_limit_exceeded"),
    (500, "api_error", "server_error"),
    (529, "overloaded_error", "overloaded_error"),
])
def test_anthropic_error_bodies_become_openai_errors(status, anthropic_type, openai_type):
    body = json.dumps(
        {"type": "error", "error": {"type": anthropic_type, "message": f"msg for {status}"}, "request_id": "req_1"}
    ).encode()
    error = translate(body, status)["error"]
    assert error == {"message": f"msg for {status}", "type": openai_type, "param": None, "code": anthropic_type}


def test_foreign_error_body_is_wrapped():
    error = translate(b"<html>502 Bad Gateway</html>", 502)["error"]
    assert "502" in error["message"] and error["code"] == "upstream_error"


def test_openai_shaped_error_body_kept():
    body = json.dumps({"error": {"message": "m", "type": "t", "param": None, "code": None}}).encode()
    assert translate(body, 400) == json.loads(body)


# --- streaming -------------------------------------------------------------------------------

def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def message_start(usage=None, msg_id="msg_s1") -> bytes:
    return sse("message_start", {"type": "message_start", "message": {
        "id": msg_id, "type": "message", "role": "assistant", "model": "claude-sonnet-4-6", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": usage or {"input_tokens": 20, "output_tokens": 1}}})


def block_start(index: int, block: dict) -> bytes:
    return sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})


def block_delta(index: int, delta: dict) -> bytes:
    return sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


def block_stop(index: int) -> bytes:
    return sse("content_block_stop", {"type": "content_block_stop", "index": index})


def message_delta(stop_reason: str, output_tokens: int = 9) -> bytes:
    return sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                 "usage": {"output_tokens": output_tokens}})


PING = b'event: ping\ndata: {"type": "ping"}\n\n'
MESSAGE_STOP = sse("message_stop", {"type": "message_stop"})


def text_stream(*texts: str, stop: str = "end_turn") -> list[bytes]:
    return [message_start(), block_start(0, {"type": "text", "text": ""}), PING,
            *[block_delta(0, {"type": "text_delta", "text": t}) for t in texts],
            block_stop(0), message_delta(stop), MESSAGE_STOP]


def run_stream(pieces, include_usage=False) -> list[bytes]:
    translator = StreamTranslator(1700000000, "claude-sonnet-4-6", include_usage)
    out = []
    for piece in pieces:
        result = translator(piece)
        assert isinstance(result, list), "a translator returns a list (never b'' for a data piece)"
        out.extend(result)
    out.extend(translator(b""))
    return out


def events_of(out: list[bytes]) -> list:
    """The client's events: parsed chunk dicts, and the string '[DONE]'."""
    text = b"".join(out).decode()
    assert text.endswith("\n\n")
    events = []
    for frame in text.split("\n\n")[:-1]:
        assert frame.startswith("data: "), frame
        data = frame[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def deltas(events) -> list[dict]:
    return [e["choices"][0]["delta"] for e in events if isinstance(e, dict) and e.get("choices")]


def test_stream_text():
    events = events_of(run_stream(text_stream("Hel", "lo")))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["id"] for c in chunks} == {"msg_s1"}
    assert all(c["object"] == "chat.completion.chunk" and c["created"] == 1700000000 for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert deltas(chunks)[1:] == [{"content": "Hel"}, {"content": "lo"}, {}]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "stop"]
    assert not any("usage" in c for c in chunks)


def test_stream_role_comes_first_even_without_message_start():
    events = events_of(
        run_stream(
            [
                block_start(0, {"type": "text", "text": ""}),
                block_delta(0, {"type": "text_delta", "text": "x"}),
                message_delta("end_turn"),
            ]
        )
    )
    assert deltas(events)[0] == {"role": "assistant", "content": "x"}
    assert events[-1] == "[DONE]"


def test_stream_tool_calls_indexed_from_zero_with_id_name_and_argument_fragments():
    stream = [
        message_start(),
        block_start(0, {"type": "text", "text": ""}),
        block_delta(0, {"type": "text_delta", "text": "Checking"}),
        block_stop(0),
        block_start(1, {"type": "tool_use", "id": "toolu_A", "name": "weather", "input": {}}),
        block_delta(1, {"type": "input_json_delta", "partial_json": ""}),
        block_delta(1, {"type": "input_json_delta", "partial_json": '{"city": '}),
        block_delta(1, {"type": "input_json_delta", "partial_json": '"Paris"}'}),
        block_stop(1),
        block_start(2, {"type": "tool_use", "id": "toolu_B", "name": "weather", "input": {}}),
        block_delta(2, {"type": "input_json_delta", "partial_json": '{"city": "Rome"}'}),
        block_stop(2),
        message_delta("tool_use"),
        MESSAGE_STOP,
    ]
    events = events_of(run_stream(stream))
    tool_deltas = [d["tool_calls"][0] for d in deltas(events) if "tool_calls" in d]
    assert tool_deltas == [
        {"index": 0, "id": "toolu_A", "type": "function", "function": {"name": "weather", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"city": '}},
        {"index": 0, "function": {"arguments": '"Paris"}'}},
        {"index": 1, "id": "toolu_B", "type": "function", "function": {"name": "weather", "arguments": ""}},
        {"index": 1, "function": {"arguments": '{"city": "Rome"}'}},
    ]
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_stream_tool_without_arguments_gets_empty_object():
    stream = [
        message_start(),
        block_start(0, {"type": "tool_use", "id": "t", "name": "now", "input": {}}),
        block_delta(0, {"type": "input_json_delta", "partial_json": ""}),
        block_stop(0),
        message_delta("tool_use"),
        MESSAGE_STOP,
    ]
    tool_deltas = [d["tool_calls"][0] for d in deltas(events_of(run_stream(stream))) if "tool_calls" in d]
    assert "".join(d["function"]["arguments"] for d in tool_deltas) == "{}"


def test_stream_thinking_becomes_reasoning_content_and_signature_dropped():
    stream = [
        message_start(),
        block_start(0, {"type": "thinking", "thinking": ""}),
        block_delta(0, {"type": "thinking_delta", "thinking": "Let me think"}),
        block_delta(0, {"type": "signature_delta", "signature": "abc"}),
        block_stop(0),
        block_start(1, {"type": "text", "text": ""}),
        block_delta(1, {"type": "text_delta", "text": "42"}),
        block_stop(1),
        message_delta("end_turn"),
        MESSAGE_STOP,
    ]
    assert deltas(events_of(run_stream(stream)))[1:3] == [{"reasoning_content": "Let me think"}, {"content": "42"}]


@pytest.mark.parametrize(
    "stop_reason,finish", [("max_tokens", "length"), ("refusal", "content_filter"), ("stop_sequence", "stop")]
)
def test_stream_finish_reasons(stop_reason, finish):
    events = events_of(run_stream(text_stream("x", stop=stop_reason)))
    assert events[-2]["choices"][0]["finish_reason"] == finish


def test_stream_usage_chunk_only_with_include_usage():
    stream = text_stream("x")
    stream[0] = message_start(
        {"input_tokens": 5, "cache_creation_input_tokens": 50, "cache_read_input_tokens": 500, "output_tokens": 1}
    )
    events = events_of(run_stream(stream, include_usage=True))
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["id"] == "msg_s1"
    assert usage_chunk["usage"] == {
        "prompt_tokens": 555,
        "completion_tokens": 9,
        "total_tokens": 564,
        "prompt_tokens_details": {"cached_tokens": 500},
    }
    assert events[-3]["choices"][0]["finish_reason"] == "stop"
    assert not any("usage" in e for e in events_of(run_stream(stream)) if isinstance(e, dict))


def test_stream_ping_dropped():
    assert events_of(run_stream(text_stream("a"))) == events_of(run_stream([p for p in text_stream("a") if p != PING]))


def test_stream_error_event_becomes_error_chunk_then_done():
    stream = [
        message_start(),
        block_start(0, {"type": "text", "text": ""}),
        block_delta(0, {"type": "text_delta", "text": "par"}),
        sse("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        block_delta(0, {"type": "text_delta", "text": "ignored"}),
    ]
    events = events_of(run_stream(stream))
    assert events[-2] == {
        "error": {"message": "Overloaded", "type": "overloaded_error", "param": None, "code": "overloaded_error"}
    }
    assert events[-1] == "[DONE]"
    assert events.count("[DONE]") == 1
    assert "ignored" not in json.dumps(events[:-1])


def test_stream_error_event_still_reports_the_usage_read_so_far():
    stream = [message_start({"input_tokens": 12, "output_tokens": 1}), block_start(0, {"type": "text", "text": ""}),
              block_delta(0, {"type": "text_delta", "text": "par"}),
              sse("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})]
    events = events_of(run_stream(stream, include_usage=True))
    assert events[-3]["choices"] == [] and events[-3]["usage"]["prompt_tokens"] == 12  # before the error
    assert events[-2]["error"]["code"] == "overloaded_error" and events[-1] == "[DONE]"
    assert not any("usage" in e for e in events_of(run_stream(stream)) if isinstance(e, dict))


def test_stream_ending_without_message_stop_still_finishes():
    events = events_of(run_stream(text_stream("a")[:4], include_usage=True))
    assert events[-3]["choices"][0]["finish_reason"] == "stop"
    assert events[-2]["choices"] == []
    assert events[-1] == "[DONE]"


def test_stream_with_finish_but_no_message_stop_has_one_finish():
    events = events_of(run_stream(text_stream("a", stop="max_tokens")[:-1]))
    assert [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"][0]["finish_reason"]] == ["length"]
    assert events[-1] == "[DONE]"


def test_stream_final_event_without_blank_line_is_handled():
    stream = text_stream("a")
    stream[-1] = stream[-1].rstrip(b"\n")
    assert events_of(run_stream(stream)) == events_of(run_stream(text_stream("a")))


def test_stream_crlf_framing():
    stream = [p.replace(b"\n", b"\r\n") for p in text_stream("a", "b")]
    assert events_of(run_stream(stream)) == events_of(run_stream(text_stream("a", "b")))


def test_nothing_after_done():
    translator = StreamTranslator(1, "m", False)
    translator(b"".join(text_stream("a")))
    assert translator(block_delta(0, {"type": "text_delta", "text": "late"})) == []
    assert translator(b"") == []


def test_exchange_stream_translator_uses_include_usage():
    _, exchange = prepare(req(stream=True, stream_options={"include_usage": True}))
    out = events_of(exchange.stream_translator()(b"".join(text_stream("x"))))
    assert out[-2]["choices"] == []
    _, exchange = prepare(req(stream=True))
    assert exchange.stream_translator().include_usage is False


# --- gzip is the adapter's job: the same translator behind fail_closed_stream -------------------

class Headers(dict):
    def get(self, key, default=None):
        return super().get(key.lower(), default)


def test_gzip_stream_through_adapter_wrapper_matches_plain():
    raw = b"".join(text_stream("Hello", " world"))
    compressed = gzip.compress(raw)
    headers = Headers(
        {"content-encoding": "gzip", "content-type": "text/event-stream", "content-length": str(len(compressed))}
    )
    stream = fail_closed_stream(StreamTranslator(1700000000, "m", False), headers, "HTTP/1.1")
    out = []
    for i in range(0, len(compressed), 7):
        result = stream(compressed[i:i + 7])
        assert result != b""
        out.extend([result] if isinstance(result, bytes) else result)
    final = stream(b"")
    out.extend([final] if isinstance(final, bytes) else final)
    assert "content-encoding" not in headers
    assert events_of(out) == events_of(run_stream([raw]))


def test_no_shipped_file_names_a_model_the_sdk_deprecates():
    """Docs, demo, examples and tests move to current models (the SDK warns on every call with a
    deprecated one); a model the installed SDK deprecates later makes this fail, by file."""
    from pathlib import Path

    from anthropic._data.deprecated_models import DEPRECATED_MODELS

    root = Path(__file__).resolve().parents[3]
    files = [root / "README.md", root / "keys.example.json", *root.glob("docs/**/*.md"), *root.glob("demo/**/*.py"),
             *root.glob("examples/**/*.py"), *root.glob("addon/**/*.py"), *root.glob("tests/**/*.py"),
             *root.glob("tests/**/*.json"), *root.glob("tests/**/*.sse"), *root.glob("deploy/**/*")]
    deprecated = re.compile("|".join(rf"(?<![\w.-]){re.escape(model)}(?![\w-])" for model in DEPRECATED_MODELS))
    named = {str(path.relative_to(root)): sorted(set(deprecated.findall(path.read_text(errors="replace"))))
             for path in files if path.is_file()}
    assert {path: models for path, models in named.items() if models} == {}
