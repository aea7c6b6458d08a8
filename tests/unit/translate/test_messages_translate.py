"""Unit tests of the Anthropic Messages -> OpenAI Chat Completions pair: request mapping, answers,
errors, and the stream translator at every byte boundary. Pure: no gateway process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from addon.apis.anthropic_messages import ANTHROPIC_MESSAGES, AnthropicStreamUsage, error_type
from addon.translate.anthropic_messages_openai_chat import (
    AnthropicMessagesToOpenAIChat,
    MessagesExchange,
    MessagesStreamTranslator,
)
from addon.translate.tables import effort_for_budget
from addon.wire.errors import GatewayError
from tests.conftest import SHARED_REFERENCE

RECORDED_OPENAI = sorted((SHARED_REFERENCE / "recorded" / "openai").glob("*.sse")) if SHARED_REFERENCE.exists() else []


def prepare(**request):
    request.setdefault("model", "gpt-4o")
    request.setdefault("messages", [{"role": "user", "content": "hi"}])
    upstream, exchange = AnthropicMessagesToOpenAIChat().prepare(request)
    return json.loads(upstream.body), upstream


def rejects(**request) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        prepare(**request)
    assert info.value.status == 400
    return info.value


# --- request ---------------------------------------------------------------------------------


def test_mid_conversation_system_messages_stay_in_place():
    body, _ = prepare(system="top", messages=[
        {"role": "user", "content": "a"}, {"role": "system", "content": [{"type": "text", "text": "mid"}]},
        {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}])
    assert [(m["role"], m["content"]) for m in body["messages"]] == [
        ("system", "top"), ("user", "a"), ("system", "mid"), ("assistant", "b"), ("user", "c")]


def test_cache_control_and_context_management_dropped_and_named():
    body, upstream = prepare(
        system=[{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}]}],
        tools=[{"name": "t", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}}],
        context_management={"edits": []}, service_tier="auto", metadata={"user_id": "u", "other": 1}, future_param=3)
    assert "cache_control" not in json.dumps(body)
    assert upstream.dropped == ("cache_control", "metadata.other", "context_management", "service_tier", "future_param")
    assert body["user"] == "u" and not upstream.keep_query


@pytest.mark.parametrize(
    "request_part,param",
    [
        ({"top_k": 5}, "top_k"),
        ({"mcp_servers": [{"url": "x"}]}, "mcp_servers"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "messages[0].content[0]"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image", "source": {}}]}
                        ],
                    }
                ]
            },
            "messages[0].content[0].content[0]",
        ),
        ({"max_tokens": 0}, "max_tokens"),
        ({"tool_choice": {"type": "any"}}, "tool_choice"),
    ],
)
def test_parameters_without_a_faithful_equivalent_are_400s_naming_them(request_part, param):
    error = rejects(**request_part)
    assert error.param == param and param.split("[")[0] in error.message


def test_tool_choice_and_parallel_calls():
    tools = [{"name": "f", "input_schema": {"type": "object"}}]
    for choice, expected in [({"type": "auto"}, "auto"), ({"type": "any"}, "required"), ({"type": "none"}, "none"),
                             ({"type": "tool", "name": "f"}, {"type": "function", "function": {"name": "f"}})]:
        body, _ = prepare(tools=tools, tool_choice=choice)
        assert body["tool_choice"] == expected
    body, _ = prepare(tools=tools, tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert body["parallel_tool_calls"] is False


def test_tool_use_and_results_in_order():
    body, upstream = prepare(
        messages=[
            {"role": "user", "content": "go"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "t", "signature": "s"},
                    {"type": "tool_use", "id": "a", "name": "f", "input": {"x": 1}},
                    {"type": "tool_use", "id": "b", "name": "g", "input": {}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "a", "content": [{"type": "text", "text": "1"}]},
                    {"type": "tool_result", "tool_use_id": "b", "content": "oops", "is_error": True},
                    {"type": "text", "text": "next"},
                ],
            },
        ]
    )
    assert body["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}
    assert body["messages"][2:] == [{"role": "tool", "tool_call_id": "a", "content": "1"},
                                    {"role": "tool", "tool_call_id": "b", "content": "oops"},
                                    {"role": "user", "content": "next"}]
    assert upstream.dropped == ("thinking_blocks", "tool_result.is_error")


def test_reasoning_mapping():
    assert [effort_for_budget(n) for n in (1024, 2000, 4096, 10000, 16384, 64000)] == [
        "low",
        "low",
        "medium",
        "medium",
        "high",
        "high",
    ]
    body, up = prepare(model="o3", thinking={"type": "adaptive"}, output_config={"effort": "max"}, max_tokens=5)
    assert body["reasoning_effort"] == "high" and body["max_completion_tokens"] == 5
    assert up.dropped == ("output_config.effort", "thinking")
    body, up = prepare(model="gpt-4o", thinking={"type": "enabled", "budget_tokens": 2048}, max_tokens=5)
    assert "reasoning_effort" not in body and body["max_tokens"] == 5 and up.dropped == ("thinking",)
    body, _ = prepare(model="gpt-5", thinking={"type": "disabled"})
    assert "reasoning_effort" not in body


def test_structured_output_and_stream_usage():
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    body, up = prepare(output_config={"format": {"type": "json_schema", "schema": schema}}, stream=True)
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    assert body["stream_options"] == {"include_usage": True} and up.dropped == ()


# --- whole answers and errors ----------------------------------------------------------------


def completion(message: dict, finish: str = "stop", usage=None) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "gpt-4o",
            "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
            "usage": usage
            or {"prompt_tokens": 10, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 4}},
        }
    ).encode()


def test_completion_to_message():
    out = json.loads(MessagesExchange("gpt-4o").translate_body(200, completion(
        {"content": "hi", "reasoning_content": "think", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}, "tool_calls")))
    assert out == {
        "id": "msg_chatcmpl-1",
        "type": "message",
        "role": "assistant",
        "model": "gpt-4o",
        "content": [
            {"type": "thinking", "thinking": "think", "signature": ""},
            {"type": "text", "text": "hi", "citations": None},
            {"type": "tool_use", "id": "c", "name": "f", "input": {"a": 1}, "caller": {"type": "direct"}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "stop_details": None,
        "container": None,
        "usage": {
            "input_tokens": 6,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 4,
            "output_tokens": 3,
            "server_tool_use": None,
            "cache_creation": None,
            "inference_geo": None,
            "service_tier": None,
        },
    }
    refusal = json.loads(
        MessagesExchange("m").translate_body(200, completion({"content": None, "refusal": "no"}, "content_filter"))
    )
    assert (
        refusal["content"] == [{"type": "text", "text": "no", "citations": None}]
        and refusal["stop_reason"] == "refusal"
    )
    deepseek = json.loads(MessagesExchange("m").translate_body(200, completion(
        {"content": "x"}, "length", {"prompt_tokens": 9, "completion_tokens": 1, "prompt_cache_hit_tokens": 5})))
    assert deepseek["stop_reason"] == "max_tokens" and deepseek["usage"]["cache_read_input_tokens"] == 5


def test_bad_tool_arguments_are_not_guessed():
    with pytest.raises(ValueError):
        MessagesExchange("m").translate_body(
            200, completion({"tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{oops"}}]})
        )


@pytest.mark.parametrize(
    "status,kind",
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (402, "billing_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (405, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (504, "timeout_error"),
        (529, "overloaded_error"),
    ],
)
def test_errors_by_status(status, kind):
    assert error_type(status) == kind
    body = json.dumps({"error": {"message": "m", "type": "whatever", "param": None, "code": None}}).encode()
    assert json.loads(MessagesExchange("m").translate_body(status, body)) == {
        "type": "error", "error": {"type": kind, "message": "m"}, "request_id": None}
    assert json.loads(MessagesExchange("m").translate_body(status, b"<html>")) == {
        "type": "error",
        "error": {"type": kind, "message": f"provider returned HTTP {status}: <html>"},
        "request_id": None,
    }
    already = b'{"type":"error","error":{"type":"x","message":"y"}}'
    assert MessagesExchange("m").translate_body(status, already) is None
    assert json.loads(ANTHROPIC_MESSAGES.error_body(GatewayError(status, "g"))) == {
        "type": "error", "error": {"type": kind, "message": "g"}, "request_id": None}


# --- streams ---------------------------------------------------------------------------------


def chunk(delta=None, finish=None, **extra) -> bytes:
    body = {
        "id": "chatcmpl-s",
        "object": "chat.completion.chunk",
        "model": "deepseek-reasoner",
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}] if delta is not None or finish else [],
        **extra,
    }
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


STREAM = b"".join(
    [
        chunk({"role": "assistant", "content": ""}),
        chunk({"reasoning_content": "Let me think \u00e9\u4e2d."}),
        chunk({"reasoning_content": " Done."}),
        chunk({"content": "Answer: "}),
        chunk({"content": "two calls."}),
        chunk(
            {
                "tool_calls": [
                    {"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}}
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"x":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}),
        chunk(
            {
                "tool_calls": [
                    {"index": 1, "id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}
                ]
            }
        ),
        chunk(finish="tool_calls"),
        chunk(usage={"prompt_tokens": 50, "completion_tokens": 20, "prompt_cache_hit_tokens": 30}),
        b"data: [DONE]\n\n",
    ]
)


def translate(pieces) -> bytes:
    translator = MessagesStreamTranslator("m")
    out = bytearray()
    for piece in [*pieces, b""]:
        for part in translator(piece):
            assert part, "a translator must never return an empty piece"
            out += part
    return bytes(out)


def events(data: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in data.decode().splitlines() if line.startswith("data: ")]


def test_stream_event_sequence_indexes_and_usage():
    out = events(translate([STREAM]))
    kinds = [(e["type"], e.get("index"), (e.get("content_block") or e.get("delta") or {}).get("type")) for e in out]
    assert kinds == [
        ("message_start", None, None),
        ("content_block_start", 0, "thinking"),
        ("content_block_delta", 0, "thinking_delta"),
        ("content_block_delta", 0, "thinking_delta"),
        ("content_block_stop", 0, None),
        ("content_block_start", 1, "text"),
        ("content_block_delta", 1, "text_delta"),
        ("content_block_delta", 1, "text_delta"),
        ("content_block_stop", 1, None),
        ("content_block_start", 2, "tool_use"),
        ("content_block_delta", 2, "input_json_delta"),
        ("content_block_delta", 2, "input_json_delta"),
        ("content_block_stop", 2, None),
        ("content_block_start", 3, "tool_use"),
        ("content_block_delta", 3, "input_json_delta"),
        ("content_block_stop", 3, None),
        ("message_delta", None, None),
        ("message_stop", None, None),
    ]
    assert out[-2]["delta"] == {
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "stop_details": None,
        "container": None,
    }
    assert out[-2]["usage"] == {"input_tokens": 20, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 30,
                                "output_tokens": 20, "server_tool_use": None}
    assert out[9]["content_block"] == {
        "type": "tool_use",
        "id": "call_a",
        "name": "f",
        "input": {},
        "caller": {"type": "direct"},
    }
    # the gateway's ledger reads the same bytes the client gets
    watcher = AnthropicStreamUsage()
    for piece in (translate([STREAM]), b""):
        watcher.feed(piece)
    assert watcher.usage[:3] == (50, 20, 30)


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_every_split_offset_gives_the_same_bytes(newline):
    stream = STREAM.replace(b"\n", newline)
    whole = translate([stream])
    for at in range(1, len(stream)):
        assert translate([stream[:at], stream[at:]]) == whole, at
    assert translate([stream[i:i + 1] for i in range(len(stream))]) == whole


def test_stream_errors_and_cut_streams():
    error = b'data: {"error": {"message": "overloaded now", "type": "overloaded_error"}}\n\n'
    out = events(translate([chunk({"content": "a"}), error, chunk({"content": "never"})]))
    assert out[-1] == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "overloaded now"},
        "request_id": None,
    }
    assert all(e.get("delta", {}).get("text") != "never" for e in out)
    cut = events(translate([chunk({"content": "a"})]))
    assert cut[-1]["type"] == "error" and cut[-2] == {"type": "content_block_stop", "index": 0}
    empty = events(translate([b"data: [DONE]\n\n"]))
    assert [e["type"] for e in empty] == ["message_start", "message_delta", "message_stop"]
    finished_without_done = events(translate([chunk({"content": "a"}), chunk(finish="length")]))
    assert finished_without_done[-2]["delta"]["stop_reason"] == "max_tokens"


def test_interleaved_tool_arguments_fail_closed():
    translator = MessagesStreamTranslator("m")
    translator(chunk({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f", "arguments": ""}}]}))
    translator(chunk({"tool_calls": [{"index": 1, "id": "b", "function": {"name": "g", "arguments": ""}}]}))
    with pytest.raises(ValueError):
        translator(chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}))


@pytest.mark.parametrize("path", RECORDED_OPENAI, ids=lambda p: p.name)
def test_recorded_openai_streams_translate_at_every_offset(path: Path):
    data = path.read_bytes()
    whole = translate([data])
    out = events(whole)
    assert out[0]["type"] == "message_start" and out[-1]["type"] == "message_stop"
    assert out[-2]["usage"]["output_tokens"] > 0
    for at in range(1, len(data), 7):
        assert translate([data[:at], data[at:]]) == whole


# --- stop sequences ----------------------------------------------------------------------------


def exchange_for(**request):
    request.setdefault("model", "gpt-4o")
    request.setdefault("messages", [{"role": "user", "content": "hi"}])
    return AnthropicMessagesToOpenAIChat().prepare(request)[1]


def stopped(exchange, finish: str = "stop", **choice_extra) -> dict:
    body = json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "m",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "a"}, "finish_reason": finish, **choice_extra}
            ],
        }
    ).encode()
    message = json.loads(exchange.translate_body(200, body))
    return {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]}


END_TURN = {"stop_reason": "end_turn", "stop_sequence": None}


def test_a_stop_sequence_is_reported_when_the_provider_names_one_that_was_asked_for():
    """OpenAI's "stop" is a natural end or a stop sequence without saying which: end_turn, unless
    the provider names the sequence (vLLM's stop_reason, SGLang's matched_stop) and it was asked for."""
    asked = exchange_for(stop_sequences=["###", "END"])
    assert stopped(asked, stop_reason="END") == {"stop_reason": "stop_sequence", "stop_sequence": "END"}
    assert stopped(asked, matched_stop="###") == {"stop_reason": "stop_sequence", "stop_sequence": "###"}
    assert stopped(asked) == END_TURN  # OpenAI itself: not knowable, not guessed
    assert stopped(exchange_for(stop_sequences=["END"])) == END_TURN  # one asked for: still maybe a natural end
    assert stopped(asked, stop_reason="other") == END_TURN  # not one of the request's
    assert stopped(asked, stop_reason=128001) == END_TURN  # a stop token's id
    assert stopped(asked, "length", stop_reason="END") == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert stopped(exchange_for(), stop_reason="END") == END_TURN  # none asked for


def test_a_streamed_stop_sequence_is_in_the_message_delta():
    translator = exchange_for(stop_sequences=["END"], stream=True).stream_translator()
    final = {"id": "c", "object": "chat.completion.chunk", "model": "m",
             "choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": "END"}]}
    data = chunk({"content": "a"}) + b"data: " + json.dumps(final).encode() + b"\n\ndata: [DONE]\n\n"
    out = events(b"".join(part for piece in (data, b"") for part in translator(piece)))
    assert out[-2]["delta"]["stop_reason"] == "stop_sequence" and out[-2]["delta"]["stop_sequence"] == "END"
    assert out[0]["message"]["stop_sequence"] is None  # message_start: not known yet, as at Anthropic
